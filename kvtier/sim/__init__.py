"""Trace replay through the real block manager: Weka agent traces, Mooncake traces, a synthetic generator."""
