"""synseg_jax: semantic segmentation from synthetic data to real streets, in JAX/Flax."""
