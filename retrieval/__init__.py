"""Dense retrieval on faiss: embedders (`embedders`, `llm_embedder`, chosen by `loading.load_embedder`),
document collections (`corpus`), inner-product indexes (`index`) and retrievers that keep all three in
one directory (`retriever`), with `steer index build|search` (`cli`).  A `.steer` program reads a
retriever through a declared `retriever` input; `train.icp`, `train.llara` and `train.radit` build on it.
"""
