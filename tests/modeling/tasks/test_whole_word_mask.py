"""whole_word_mask: known answers of the masking rule (whole words, 80/10/10, at least one word, -100
elsewhere), its rates over many texts, and masks that depend only on each text's seed."""
import pytest
import torch

from up2.modeling.tasks.mlm import whole_word_mask

MASK = 99
# <s> the quick brown fox </s> <pad>: "quick" and "fox" are two tokens each
INPUT_IDS = torch.tensor([[0, 10, 11, 12, 13, 14, 15, 2, 1]])
WORD_IDS = [[None, 0, 1, 1, 2, 3, 3, None, None]]
WORD_POSITIONS = {0: [1], 1: [2, 3], 2: [4], 3: [5, 6]}
NOT_WORDS = [0, 7, 8]


def _mask(mask_prob, replace_probs, random_ids=(50,), seed=0, input_ids=INPUT_IDS, word_ids=WORD_IDS):
    return whole_word_mask(input_ids, word_ids, MASK, torch.tensor(random_ids), mask_prob, replace_probs,
                           generator=torch.Generator().manual_seed(seed))


def test_every_word_chosen_and_replaced_by_the_mask_token():
    masked, targets = _mask(1.0, (1.0, 0.0, 0.0))
    assert masked.tolist() == [[0, MASK, MASK, MASK, MASK, MASK, MASK, 2, 1]]
    assert targets.tolist() == [[-100, 10, 11, 12, 13, 14, 15, -100, -100]]


def test_random_replacement_draws_from_the_given_ids_only():
    masked, targets = _mask(1.0, (0.0, 1.0, 0.0), random_ids=(50,))
    assert masked.tolist() == [[0, 50, 50, 50, 50, 50, 50, 2, 1]]
    assert targets.tolist() == [[-100, 10, 11, 12, 13, 14, 15, -100, -100]]


def test_unchanged_replacement_keeps_the_ids_but_sets_targets():
    masked, targets = _mask(1.0, (0.0, 0.0, 1.0))
    assert torch.equal(masked, INPUT_IDS)
    assert targets.tolist() == [[-100, 10, 11, 12, 13, 14, 15, -100, -100]]


@pytest.mark.parametrize("seed", range(8))
def test_at_least_one_whole_word_is_masked(seed):
    """With a vanishing probability no word is drawn: exactly one word is chosen instead, all its tokens."""
    masked, targets = _mask(1e-12, (1.0, 0.0, 0.0), seed=seed)
    positions = (targets != -100).nonzero()[:, 1].tolist()
    assert positions in list(WORD_POSITIONS.values())
    assert masked[0, positions].eq(MASK).all() and targets[0, positions].tolist() == INPUT_IDS[0, positions].tolist()
    untouched = [t for t in range(INPUT_IDS.shape[1]) if t not in positions]
    assert torch.equal(masked[0, untouched], INPUT_IDS[0, untouched])


def test_text_without_words_is_left_alone():
    ids = torch.tensor([[0, 2, 1]])
    masked, targets = whole_word_mask(ids, [[None, None, None]], MASK, torch.tensor([50]))
    assert torch.equal(masked, ids) and targets.tolist() == [[-100, -100, -100]]


def test_rates_over_many_texts():
    """15 % of the words are chosen; a chosen word is masked / randomised / kept 80 / 10 / 10 % of the time,
    one decision for all its tokens."""
    num_texts, num_words = 400, 50
    word_ids = [[w // 2 for w in range(2 * num_words)] for _ in range(num_texts)]  # two tokens per word
    ids = torch.arange(2 * num_words).repeat(num_texts, 1) + 1000
    masked, targets = whole_word_mask(ids, word_ids, MASK, torch.tensor([7]),
                                      generator=torch.Generator().manual_seed(3))
    chosen = targets != -100
    outcome = torch.where(masked == MASK, 0, torch.where(masked == 7, 1, 2))  # mask / random / kept
    first, second = (slice(None), slice(0, None, 2)), (slice(None), slice(1, None, 2))
    assert torch.equal(chosen[first], chosen[second])  # whole words
    assert torch.equal(outcome[first][chosen[first]], outcome[second][chosen[second]])
    assert chosen[first].float().mean().item() == pytest.approx(0.15, abs=0.01)
    word_outcomes = outcome[first][chosen[first]]
    shares = torch.bincount(word_outcomes, minlength=3).float() / word_outcomes.numel()
    assert shares.tolist() == pytest.approx([0.8, 0.1, 0.1], abs=0.025)
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_seeded_masks_depend_only_on_each_texts_seed():
    ids = torch.cat([INPUT_IDS, INPUT_IDS + 100])
    ids[1, [0, 7, 8]] = INPUT_IDS[0, [0, 7, 8]]
    word_ids = WORD_IDS * 2
    both = whole_word_mask(ids, word_ids, MASK, torch.tensor([50, 51]), mask_prob=0.5, seeds=[11, 12])
    second_alone = whole_word_mask(ids[1:], word_ids[1:], MASK, torch.tensor([50, 51]), mask_prob=0.5, seeds=[12])
    assert torch.equal(both[0][1:], second_alone[0]) and torch.equal(both[1][1:], second_alone[1])
    again = whole_word_mask(ids, word_ids, MASK, torch.tensor([50, 51]), mask_prob=0.5, seeds=[11, 12])
    assert all(torch.equal(a, b) for a, b in zip(both, again))
