"""The base every layer stands on: parameters and their schema, atomic I/O, paths, statistics, plotting."""
