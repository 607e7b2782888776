#!/usr/bin/env python
"""Write the pretrained CLIP image encoder as its own HF directory (theta0 for `saft-hf merge`):

    python recipes/clip_vision/export_pretrained.py openai/clip-vit-base-patch32 runs/clip_vision/ViT-B-32/pretrained

Fine-tuned checkpoints hold only the image tower (keys vision_model.*, visual_projection.*); a merge
config's `pretrained:` must have the same keys, which a full CLIP checkpoint (with its text tower) has not.
"""
import sys

from saft_hf.vision.model import save_pretrained_vision_encoder

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(save_pretrained_vision_encoder(sys.argv[1], sys.argv[2]))
