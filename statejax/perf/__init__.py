"""Tools that measure or profile: rooflines, step profiles, kernel censuses, traces, tile grids,
kernel benches and compile-only GPU targets. Only `perf/`, `studies/`, experiments and tests
import this package; the library runs without it."""
