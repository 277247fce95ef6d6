import sys, time, numpy as np, torch
sys.path.insert(0, '.')
import fid
from scipy import linalg
torch.manual_seed(0)
ex = fid.FeatureExtractor(device="cpu", batch_size=100); ex.load()
net = ex._model
def bf16_autocast(x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return net(x).float()
ex_bf = fid.FeatureExtractor(device="cpu", batch_size=100, model=bf16_autocast); ex_bf.load()
# real-ish images: smooth random + noise
n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
a = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
a = torch.nn.functional.interpolate(a.float(), size=32, mode="bilinear").clamp(0, 255).to(torch.uint8)
b = (a.float() + 25 * torch.randn(a.shape)).clamp(0, 255).to(torch.uint8)
for e in (ex, ex_bf): e(a[:100])
res = {}
for name, e in (("fp32", ex), ("bf16", ex_bf)):
    t0 = time.perf_counter(); fa = e(a); fb = e(b); dt = time.perf_counter() - t0
    res[name] = (fa, fb, 2 * n / dt)
    print(name, f"{2*n/dt:.2f} img/s", flush=True)
def fd(x, y):
    m1, m2 = x.mean(0), y.mean(0); s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    c = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * c))
fa, fb, _ = res["fp32"]; ga, gb, _ = res["bf16"]
print("rel feature diff", np.linalg.norm(fa - ga) / np.linalg.norm(fa))
print("FID fp32", fd(fa, fb), "bf16", fd(ga, gb))
