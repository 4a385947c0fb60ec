"""kvtier's benchmarks, installed with the package: ``kvtier bench NAME`` (see ``kvtier.bench.cli``)."""
