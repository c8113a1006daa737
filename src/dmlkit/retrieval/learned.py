"""Learned local features through kornia: DISK (Tyszkiewicz et al. 2020), tensors in, arrays out.

kornia and its weights are needed only when `retrieve.verify.extractor: disk`. The weights are
kornia's published checkpoint ('depth': `{"extractor": state_dict}`), fetched into the torch hub
cache, or a local file of either that form or a bare state dict. DISK is a U-Net: on a CPU core
it takes seconds per 512-px image, so it is a GPU extractor (README, "Second stage").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ExtractorWeightsError
from .local import LocalFeatures


def load_disk(weights_file: str | None, device: torch.device, where: str) -> torch.nn.Module:
    """DISK in eval mode on `device`, from a local file or kornia's 'depth' checkpoint."""
    from kornia.feature import DISK  # kornia loads only for retrieve.verify.extractor: disk

    if weights_file is None:
        try:
            return DISK.from_pretrained("depth", device=device).eval()
        except Exception as exc:  # offline, moved URL: all end the same way
            raise ExtractorWeightsError(
                f"{where}: cannot get kornia's DISK weights ({type(exc).__name__}: {exc}). Offline? Run once "
                "online (they stay in the torch hub cache), or set retrieve.verify.weights_file to a local file"
            ) from None
    path = Path(weights_file)
    if not path.is_file():
        raise ExtractorWeightsError(f"{where}: retrieve.verify.weights_file '{weights_file}' is not a file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("extractor", state) if isinstance(state, dict) else state
    model = DISK()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise ExtractorWeightsError(f"{where}: '{weights_file}' holds no DISK weights: {exc}") from None
    return model.to(device).eval()


@torch.inference_mode()
def disk_features(model: torch.nn.Module, rgb: np.ndarray, max_keypoints: int) -> LocalFeatures:
    """The `max_keypoints` best DISK keypoints (x, y in pixels) of a uint8 RGB image, with their
    unit-norm 128-d descriptors stored as float16; none for an image under 16 px."""
    if rgb.size == 0 or min(rgb.shape[:2]) < 16:
        return LocalFeatures.empty()
    device = next(model.parameters()).device
    image = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)[None].float() / 255.0
    found = model(image, n=max_keypoints, pad_if_not_divisible=True)[0]
    keypoints = found.keypoints.float().cpu().numpy().reshape(-1, 2)
    descriptors = found.descriptors.float().cpu().numpy().reshape(-1, model.desc_dim)
    return LocalFeatures(keypoints.astype(np.float32), descriptors.astype(np.float16))
