"""Search time of one query-guided graph on the bundled model's own 32K Q/K (layer 3, query head 0), one thread.

    python scripts/dev/search_time.py [ef] [repeats]     # needs benchmarks/results/cache/model_qk_T32768.npz

Prints microseconds per query and a hash of the returned ids (equal hashes: identical results), for comparing two
builds of the extension side by side.
"""
import numpy as np, torch, time, sys
import retrieval_attention as ra
z=np.load('benchmarks/results/cache/model_qk_T32768.npz')
L,H=3,0
k=torch.from_numpy(z['k'][L, H//3].astype(np.float32))
q=torch.from_numpy(z['q'][L, H].astype(np.float32)); pos=z['q_pos']
n=32704
keys=k[:n].bfloat16()
train=q[pos < n]
evalq=q[pos >= n][:64]
torch.set_num_threads(1)
idx=ra.QueryGuidedIndex(keys, train)
ef=int(sys.argv[1]) if len(sys.argv)>1 else 200
idx.search(evalq, k=100, ef=ef)
t=time.perf_counter(); R=int(sys.argv[2]) if len(sys.argv)>2 else 50
for _ in range(R): ids,_=idx.search(evalq, k=100, ef=ef)
dt=(time.perf_counter()-t)/R/len(evalq)
print(f"ef {ef}: {dt*1e6:.1f} us/query, 1 thread, ids hash {__import__('hashlib').sha1(ids.numpy().tobytes()).hexdigest()[:12]}")
