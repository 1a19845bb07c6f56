"""Stand-ins for your own VLM pair: a tiny random SmolVLM student and a Qwen2-VL teacher (another
family with the same vocabulary), built from the real transformers classes by mmdistill.models.tiny
and saved as Hugging Face directories. Replace them with your checkpoints' directories.

    python examples/vlm_boxes/make_pair.py runs/vlm_pair
"""
import sys
from pathlib import Path

from mmdistill.models.tiny import save_family

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/vlm_pair")
print(save_family("smolvlm", out / "student", seed=0))
print(save_family("qwen2_vl", out / "teacher", seed=1))
