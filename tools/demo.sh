#!/usr/bin/env bash
# The main job (`make demo`): generate the embedded `shapes` dataset, train and evaluate on it.
#   tools/demo.sh PYTHON SHAPES_DIR CONFIG OUTPUT_DIR [KEY VALUE ...]   (extra config overrides)
set -euo pipefail
PY="$1"; SHAPES_DIR="$2"; CONFIG="$3"; OUTPUT="$4"; shift 4
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export DETECTRON2_DATASETS="$(dirname "$SHAPES_DIR")"

start=$(date +%s)
# reuse a complete dataset of the current generator version (an older one is regenerated in place);
# the check prints "current" or why the dataset has to be (re)generated
status=$("$PY" - "$SHAPES_DIR" <<'PYEOF'
import json, os, sys
from up2.data.shapes import load_spec
version = load_spec()["version"]
try:
    info = json.load(open(os.path.join(sys.argv[1], "shapes_info.json")))
except (OSError, ValueError):
    print(f"none yet; generator version {version}")
else:
    if info.get("complete") and info.get("generator_version") == version:
        print("current")
    else:
        print(f"found version {info.get('generator_version')}, complete {info.get('complete')}; "
              f"generator version {version}")
PYEOF
)
if [[ "$status" == "current" ]]; then
  echo "[demo] reusing $SHAPES_DIR (delete it to regenerate)"
else
  echo "[demo] generating the shapes dataset in $SHAPES_DIR ($status)"
  "$PY" -m up2.data.shapes --out "$SHAPES_DIR" --seed 0
fi
echo "[demo] training $CONFIG -> $OUTPUT"
"$PY" train_net.py --config-file "$CONFIG" OUTPUT_DIR "$OUTPUT" "$@"
end=$(date +%s)
echo
echo "[demo] done in $((end - start)) s. Produced:"
echo "  dataset:        $SHAPES_DIR (COCO instances/captions json, class folders, text corpus, tokenizer)"
echo "  weights:        $OUTPUT/model_final.pth"
echo "  metrics:        $OUTPUT/metrics.json (TensorBoard events beside it), log: $OUTPUT/log.txt"
echo "  evaluation:     $OUTPUT/eval_results.json"
if [[ -f "$OUTPUT/eval_results.json" ]]; then
  "$PY" - "$OUTPUT/eval_results.json" <<'PYEOF'
import json, sys
for dataset, metrics in json.load(open(sys.argv[1])).items():
    main = {k: v for k, v in metrics.items() if "/AP-" not in k and v is not None}
    print(f"  {dataset}: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(main.items())))
PYEOF
fi
if [[ -f "$OUTPUT/model_final.pth" ]]; then
  # detections, top class and caption of the first validation images, in one picture (log beside it)
  if "$PY" tools/demo_picture.py --config-file "$CONFIG" --weights "$OUTPUT/model_final.pth" \
      --dataset shapes_det_val --num-images 6 --output "$OUTPUT/demo_predictions.png" "$@" \
      > "$OUTPUT/demo_picture.log" 2>&1; then
    echo "  picture:        $OUTPUT/demo_predictions.png (detections, top class, caption of 6 val images)"
  else
    echo "[demo] tools/demo_picture.py failed; the end of $OUTPUT/demo_picture.log:" >&2
    tail -n 20 "$OUTPUT/demo_picture.log" >&2
    exit 1
  fi
fi
