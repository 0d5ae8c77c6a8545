"""Model-holding side of kaizen: runtime, stages, training, Celery tasks."""

import os

# Without this, transformers probes the hub during generate() and waits on network timeouts
# (seconds per call on an offline machine). kaizen loads local checkpoints; set
# HF_HUB_OFFLINE=0 to let `model.path` name a hub id that should be downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Per-load progress bars would flood worker logs; kaizen reports progress itself.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
