"""The camera of the `real` style: exposure and white balance, vignetting, lens blur, sensor noise
and JPEG. Every parameter is drawn per image, whether or not the `sensor` knob is on, so that
turning it off changes nothing else."""

from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
from PIL import Image


@functools.lru_cache(maxsize=8)
def _noise_tile(h: int, w: int) -> np.ndarray:
    """Planar unit Gaussian noise a little larger than an image, read at a random offset."""
    return np.random.default_rng(7).standard_normal((3, h + 32, w + 32)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Sensor:
    gains: np.ndarray      # (3,) exposure x white balance
    vignetting: float      # darkening at the corners relative to the centre
    noise_std: float       # in 0..255 units
    noise_offset: tuple[int, int]
    jpeg_quality: int
    on: bool

    @classmethod
    def draw(cls, rng: np.random.Generator, on: bool) -> "Sensor":
        gains = np.float32(rng.uniform(0.85, 1.15)) * np.array(
            (rng.uniform(1.0, 1.12), 1.0, rng.uniform(0.82, 0.98)), np.float32)
        vignetting = float(rng.uniform(0.15, 0.4) * 2.0)
        noise_std = float(rng.uniform(2.0, 7.0))
        offset = tuple(int(o) for o in rng.integers(32, size=2))
        quality = int(rng.integers(30, 80))
        return cls(gains, vignetting, noise_std, offset, quality, on)

    def white_balance(self) -> np.ndarray:
        return self.gains if self.on else np.ones(3, np.float32)

    def vignette(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """(H, W) multiplicative fall-off (1 everywhere when off)."""
        if not self.on:
            return np.ones((ys.shape[0], xs.shape[1]), np.float32)
        return 1.0 - np.float32(self.vignetting) * ((xs - 0.5) ** 2 + (ys - 0.5) ** 2)

    def capture(self, img: np.ndarray) -> np.ndarray:
        """Planar float (3, H, W) radiance in 0..255 -> (H, W, 3) uint8 as the camera stores it.
        Works in place on `img`."""
        if self.on:
            # Lens: a 2x2 box blur (a half-pixel shift) in each direction; edges keep their value.
            img[:, 1:] += img[:, :-1]
            img[:, 0] *= 2.0
            img[:, :, 1:] += img[:, :, :-1]
            img[:, :, 0] *= 2.0
            img *= 0.25
            h, w = img.shape[1:]
            oy, ox = self.noise_offset
            img += np.float32(self.noise_std) * _noise_tile(h, w)[:, oy:oy + h, ox:ox + w]
        img += 0.5  # round to the nearest level, as the sim style does
        np.clip(img, 0, 255, out=img)
        out = img.astype(np.uint8).transpose(1, 2, 0)
        if not self.on:
            return np.ascontiguousarray(out)
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=self.jpeg_quality)
        return np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
