"""Test setup: silence TensorFlow's start-up chatter, keep it off any accelerator, and compile less.

The tests' nets are tiny, so XLA compiling them takes most of the suite's time, not running them:

* ``JAX_DISABLE_MOST_OPTIMIZATIONS`` turns XLA's backend optimisation down (LLVM opt level 0, no
  expensive passes): one tiny DeepLabV2's ``init`` compiles in 10 s instead of 40 s on a CPU.
  Arithmetic stays IEEE float32 (no fast math); the parity and equality tests pass at their
  tolerances.
* A compilation cache for this session only: a fresh, empty directory, shared by the xdist workers
  and every subprocess a test starts, removed at the end. A program compiled once (the same tiny
  training step in a dozen training-loop tests, the same eval step in every stage of a recipe) is
  then loaded instead of compiled again; the cache key is the whole program plus its compile
  options, so a hit is the executable a fresh compile would give. Nothing carries over between
  sessions.

Both are environment variables, not ``XLA_FLAGS`` entries, so subprocesses inherit them even where
a test replaces ``XLA_FLAGS`` (the fake-device tests). Either can be set beforehand to override
(``JAX_DISABLE_MOST_OPTIMIZATIONS=0`` for fully optimised code, ``JAX_ENABLE_COMPILATION_CACHE=0``
for no cache).
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # The xdist controller (or a plain run) makes the directory; workers inherit the variable.
    _cache_dir = tempfile.mkdtemp(prefix="synseg_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    # A size limit makes JAX lock the directory around each read and write (several processes
    # share it); it is never reached (the suite writes a few hundred MB at most).
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
    # Only programs that take half a second or more to compile are stored.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (after the environment above, which JAX reads when it is imported)

# In case a plugin imported JAX before this file set the environment.
jax.config.update("jax_disable_most_optimizations", os.environ[
    "JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "y", "yes", "t", "true", "on"))
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    for _name, _type in (("jax_compilation_cache_max_size", int),
                         ("jax_persistent_cache_min_compile_time_secs", float)):
        if _name.upper() in os.environ:
            jax.config.update(_name, _type(os.environ[_name.upper()]))
