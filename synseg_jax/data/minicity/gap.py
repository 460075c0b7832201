"""The knobs of minicity's domain gap: what the `real` splits change with respect to `sim`.

Each knob is one way a game differs from a photo. Turning a knob off renders the `real` splits
with the `sim` value of that factor and leaves every other factor (and every random draw) as it
is, so source-only with one knob off measures what that factor contributes to the gap
(BENCHMARKS.md, "minicity 2.0.0: what each knob contributes").
"""

from __future__ import annotations

import dataclasses

KNOBS: dict[str, str] = {
    "palette": "material colours: the real palette (duller, greyer, more varied) instead of the "
               "game's saturated one, and a wider per-instance brightness spread",
    "texture": "surface texture of each material (asphalt grain, paving, brick, foliage), ground "
               "textures in perspective",
    "lighting": "directional face shading at full strength, cast shadows on the ground, a light "
                "gradient across the frame and haze towards the horizon",
    "sensor": "white balance and exposure, vignetting, lens blur, sensor noise and JPEG",
    "camera": "a lower camera whose horizon sits lower, narrower and less curved roads, lower "
              "buildings",
    "frequencies": "class frequencies: fewer trucks and buses, more people, bicycles, poles, "
                   "trees and verges",
}


@dataclasses.dataclass(frozen=True)
class Gap:
    """Which knobs are on for the `real` splits (all of them by default)."""

    palette: bool = True
    texture: bool = True
    lighting: bool = True
    sensor: bool = True
    camera: bool = True
    frequencies: bool = True

    @classmethod
    def without(cls, off: tuple[str, ...] | list[str] = ()) -> "Gap":
        """All knobs on except those named in `off`."""
        unknown = sorted(set(off) - set(KNOBS))
        if unknown:
            raise ValueError(f"Unknown minicity gap knob(s) {unknown}; known knobs: {list(KNOBS)}")
        return cls(**{name: name not in off for name in KNOBS})

    @property
    def off(self) -> tuple[str, ...]:
        return tuple(name for name in KNOBS if not getattr(self, name))


FULL = Gap()
