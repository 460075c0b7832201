"""Networks: backbones, segmenters, discriminators, translators."""
