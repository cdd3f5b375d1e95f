"""Benchmarks of diffusers-sdnq against dense and the reference ``sdnq``; see ``bench/run.py``."""
