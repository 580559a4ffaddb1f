"""The local metrics, each on its own read of the store: k-NN overlap on FAISS (:mod:`.knn`, searching in blocks with
:mod:`.knn_search`, reading with :mod:`.store_rows`) and cross-model linear probes on pooled document features
(:mod:`.probe`); both sized to ``--memory-budget`` by :mod:`.memory` and given document-bootstrap intervals by
:mod:`.bootstrap`."""
