"""minicity: a procedural sim-to-real street-scene benchmark in the Cityscapes trainId taxonomy.

An example is a pure function of (split, index, seed, size). A scene *layout* (camera, curved road,
buildings, vehicles, people, poles ...) is sampled from a per-example RNG as 3-D boxes and
billboards, projected once to normalised image coordinates and painted far to near. Rendering
rasterises the layout into a primitive-index map; the label map and the image are both looked up
from that one map, so the `sim` and `real` renderings of a layout share their labels exactly.

The domain gap is built in on purpose, as named knobs (gap.py, docs/minicity.md): the `real`
style has a photo's palette, textures, lighting (shading, shadows, haze) and sensor (white balance,
vignetting, blur, noise, JPEG); the `real` camera sits lower and the class mix differs (more people
and two-wheelers, fewer trucks and buses). `sim_topdown` (SYNTHIA-like) looks from high up through
a wide lens and never shows terrain, trucks or trains. Instances vary in colour within a style, so
shape, context and position carry the semantics.

The only process state is a cache of texture and sensor-noise tiles, built from fixed seeds so
that every process renders byte-identical examples.

Modules, by what they own: `gap` (the knobs), `materials` (class ids, palettes, texture tiles),
`geometry` (camera, road, shapes, the layout builder), `things` (people, vehicles, street
furniture), `layout` (domains and the scene sampler), `raster` (index and label maps), `render`
(styles: textures, lighting), `sensor` (the real style's camera), `examples` (splits, object
crops, preview).

`python -m synseg_jax.data.minicity --preview=PATH` writes a grid of examples.
"""

from synseg_jax.data.minicity.examples import (  # noqa: F401
    DEFAULT_NUM_EXAMPLES, DEFAULT_OBJECT_SIZE, SCENE_SPLITS, SPLIT_INFO, SPLITS, VERSION,
    example_rng, gap_suffix, main, preview, render_example, render_labels, scene_layout)
from synseg_jax.data.minicity.gap import FULL, KNOBS, Gap  # noqa: F401
from synseg_jax.data.minicity.geometry import Camera, Layout, Road  # noqa: F401
from synseg_jax.data.minicity.layout import (  # noqa: F401
    DOMAINS, DomainParams, domain_params, sample_layout)
from synseg_jax.data.minicity.materials import (  # noqa: F401  (class ids)
    BICYCLE, BUILDING, BUS, CAR, FENCE, LIGHT, MOTORCYCLE, PERSON, POLE, RIDER, ROAD, SIDEWALK,
    SIGN, SKY, TERRAIN, TRAIN, TRUCK, VEGETATION, WALL)
from synseg_jax.data.minicity.materials import TEXTURES, texture_tiles  # noqa: F401
from synseg_jax.data.minicity.raster import (  # noqa: F401
    DEFAULT_SCENE_SIZE, rasterize_index, rasterize_labels)
from synseg_jax.data.minicity.render import STYLES, render_image  # noqa: F401
