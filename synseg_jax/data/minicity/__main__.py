"""`python -m synseg_jax.data.minicity --preview=PATH` writes a grid of examples."""

from synseg_jax.data.minicity.examples import main

if __name__ == "__main__":
    main()
