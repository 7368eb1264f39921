"""``python -m benchmarks host``'s machinery: its no-op launch point is the one every kernel launch goes through
(a launch that bypassed it would run the interpreter and be timed as host work)."""
import torch

from benchmarks.bench_host import NoOpLaunches, markdown, time_us
from fastroberta.kernels import layer_norm


def test_no_op_launches_catch_every_kernel_launch():
    x = torch.randn(4, 32, requires_grad=True)
    with NoOpLaunches() as launches:
        y = layer_norm(x, None, None, residual=torch.randn(4, 32), dropout_p=0.1)
        assert launches.launches == 1
        y.backward(torch.ones_like(y))
        assert launches.launches == 2
    assert time_us(lambda: None, min_time=0.001) >= 0.0


def test_report_names_the_machine_and_what_it_leaves_out():
    result = dict(machine=dict(cpu="cpu", logical_cpus=2, torch_threads=1, python="3", torch="t", triton="3.9"),
                  ops=[], calls=[], steps=[], step_config=dict(num_hidden_layers=1, hidden_size=8,
                                                               num_attention_heads=1, intermediate_size=16,
                                                               vocab_size=10, batch=1, seq_len=4))
    text = markdown(result)
    assert "CPU host time on this machine" in text and "not measured here" in text
