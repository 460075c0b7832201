"""Data layer: taxonomies, the minicity benchmark, dataset builders and the tf.data pipeline."""
