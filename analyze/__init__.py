"""HRSA metrics: streaming accumulators on Dask, k-NN overlap on FAISS, linear probes, results, report."""
