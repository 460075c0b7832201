"""TFDS builders for the datasets the project trains and evaluates on."""
