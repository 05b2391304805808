"""A NumPy pipeline calling the metrics directly: arrays in, tensors out (``.numpy()`` to get arrays back).

Run: python docs/examples/numpy_arrays.py
"""
import numpy as np

from repforget_kernels import StreamingCKA, cka_matrix, linear_cka, pca_shift, pca_similarity

rng = np.random.default_rng(0)
base = rng.standard_normal((1000, 64)).astype(np.float32)            # (n samples, d features), rows are samples
tuned = base @ rng.standard_normal((64, 64)).astype(np.float32) * 0.1 + base  # the same samples after a change
layers = rng.standard_normal((4, 1000, 64)).astype(np.float32)       # (L layers, n, d)

print("linear CKA          ", float(linear_cka(base, tuned)))
print("debiased CKA        ", float(linear_cka(base, tuned, debiased=True)))
print("CKA between layers  ", cka_matrix(layers).numpy().round(3))
print("PCA similarity (k=1)", float(pca_similarity(base, tuned)))
print("PCA similarity (k=4)", float(pca_similarity(base, tuned, k=4)))
print("PCA shift, in reference standard deviations", pca_shift(base, tuned + 0.5, k=2, normalize=True).numpy())

# rows arriving in chunks (e.g. read from disk): exact CKA in O(d^2) memory
stream = StreamingCKA()
for start in range(0, len(base), 256):
    stream.update(base[start:start + 256], tuned[start:start + 256])
print("streamed CKA        ", float(stream.compute()), "(equals linear CKA above)")
