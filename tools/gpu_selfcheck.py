"""Quick checks of the GPU paths before a long run: the int4 kernel against the dequantized weight,
and the captured decode step against plain generate. Run on the GPU machine: PYTHONPATH=src python tools/gpu_selfcheck.py"""

import torch
import torch.nn.functional as F

from quantlesson import kernels, measure, models
from quantlesson.scratch import rtn

torch.manual_seed(0)
print(torch.__version__, torch.cuda.get_device_name())
linear = torch.nn.Linear(1024, 512, bias=False).cuda().bfloat16()
layer = kernels.Int4PackLinear.from_linear(linear, group_size=128)
x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
expected = F.linear(x.float(), rtn.fake_quantize(linear.weight.float(), 4, 128).float())
error = ((layer(x).float() - expected).norm() / expected.norm()).item()
print(f"int4 kernel vs dequantized matmul: relative error {error:.2e}")
assert error < 1e-2, error

model = models.twin("Llama-3.2-1B", dtype=torch.bfloat16, device="cuda")
ids = torch.randint(0, 1000, (1, 16), device="cuda")
for graph, compile in ((False, False), (True, False)):
    print(measure.static_decode_speed(model, ids, new_tokens=32, graph=graph, compile=compile, check_tokens=8))
kernels.quantize_to_int4pack(model, 128)
print(measure.static_decode_speed(model, ids, new_tokens=32, graph=True, check_tokens=8))
print("selfcheck passed")
