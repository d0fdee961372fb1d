"""Tensor-parallel runtime: real ranks, streams and collectives for the SPD latency study.

spd/ is single-device (the emulation is the reference); overlap/ owns ranks, process groups, CUDA
graphs and benchmarks. Nothing here is imported by spd/.
"""
