"""On-disk formats and nothing else: the LMDB patch gallery and the HDF5 text store."""
