"""Batches from a memory budget: the measured cost of real models (pairs only where a pair matrix is
built), long events sharing batches, a model's declared cost, the device budget, canonical padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icegrid.geometry import icecube86
from icegrid.inference import MemoryShard, predict_stream
from icegrid.models import memory, registry
from icegrid.models.base import MemoryCost
from icegrid.models.features import bucket_batches, inference_batches, padded_length
from icegrid.models.gpt_boost import GPTBoost
from icegrid.store import ShardData


def test_measured_cost_has_a_pair_term_only_where_a_pair_matrix_is_built():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    icemix = registry.build("icemix", "full")          # relative (Minkowski) bias: (B, L, L, C) tensors
    cost = memory.model_cost(icemix, icecube86())
    assert cost.per_pair > 100 and memory.model_cost(icemix, icecube86()) is cost     # measured once
    # The fit from probes of <= 128 pulses predicts the counted peak at an unseen length.
    counted = max(memory.live_bytes_trace(icemix, icecube86(), 176, "cpu", False)) / memory.PROBE_EVENTS
    predicted = cost.batch_bytes(1, 176) / memory.SAFETY
    assert 0.97 * predicted < counted <= 1.01 * predicted
    gpt = memory.model_cost(registry.build("gpt_boost", "small"), icecube86())     # fused attention
    assert gpt.per_pair == 0 and gpt.per_token > 0
    assert cost.batch_bytes(1, 700) / cost.batch_bytes(1, 350) > 3.0                # ~L^2
    assert gpt.batch_bytes(1, 700) / gpt.batch_bytes(1, 350) < 2.1                 # ~L


def test_long_events_share_batches_when_the_model_costs_tokens():
    lengths = np.full(20, 1500)
    cost = MemoryCost(per_event=4096, per_token=30_720)          # ~ the 3rd place's full GPT per pulse
    batches = inference_batches(lengths, 256, cost=cost, max_bytes=256 << 20)
    per_batch = int((256 << 20) // cost.batch_bytes(1, int(padded_length(np.array([1500]))[0])))
    assert [len(b) for b, _ in batches] == [per_batch] * (20 // per_batch) + [20 % per_batch] * (20 % per_batch > 0)
    assert per_batch >= 5
    assert len(bucket_batches(lengths, 256, 16384, max_pairs=1 << 21)) == 20       # the old caps: alone
    quadratic = MemoryCost(per_pair=40_000.0)                     # a pair matrix this big: one at a time
    assert all(len(b) == 1 for b, _ in inference_batches(lengths, 256, cost=quadratic, max_bytes=256 << 20))


class DeclaredGPT(GPTBoost):
    """icegrid's 3rd place model, declaring its memory instead of being measured."""

    def memory_cost(self) -> MemoryCost:
        return MemoryCost(per_event=1_000_000)


def test_a_declared_cost_sizes_the_batches(tmp_path):
    torch.manual_seed(0)
    loaded = registry.build("gpt_boost", "small")
    model = DeclaredGPT(loaded.preset_config)
    model.load_state_dict(loaded.model.state_dict())
    loaded.model = model.eval()
    assert memory.model_cost(loaded, icecube86()) == MemoryCost(per_event=1_000_000)
    rng = np.random.default_rng(0)
    n = np.full(95, 30)
    total = int(n.sum())
    data = ShardData(name="t", event_id=np.arange(95), offset=np.r_[0, np.cumsum(n)],
                     pulses={"sensor_id": rng.integers(0, 5160, total).astype(np.int16),
                             "time": np.sort(rng.integers(6000, 9000, total)), "charge": rng.uniform(0.5, 2, total),
                             "auxiliary": rng.random(total) < 0.3})
    result = predict_stream(loaded, MemoryShard(data), icecube86(), memory_budget=10_000_000)
    assert result.forward_calls == 10 and result.budget_bytes == 10_000_000      # 9 x 10 events + 5
    assert predict_stream(loaded, MemoryShard(data), icecube86(), memory_budget=10**9).forward_calls == 1


def test_device_budget(monkeypatch):
    monkeypatch.delenv(memory.BUDGET_ENV, raising=False)
    assert memory.device_budget("cpu") == memory.DEFAULT_CPU_BUDGET
    assert memory.device_budget("cpu", 12345) == 12345
    monkeypatch.setenv(memory.BUDGET_ENV, "512M")
    assert memory.device_budget("cpu") == 512 << 20
    assert memory.parse_bytes("2GiB") == 2 << 30 and memory.parse_bytes("1000") == 1000
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError, match=f"{memory.BUDGET_ENV}=") as err:
            memory.parse_bytes(bad)
        assert "\n" not in str(err.value)


def test_padded_length_depends_on_the_length_alone():
    lengths = np.arange(1, 7000)
    padded = padded_length(lengths)
    assert (padded >= lengths).all() and (np.diff(padded) >= 0).all()
    assert (padded[lengths <= 64] % 8 == 0).all()
    assert (padded[lengths > 64] <= np.ceil(lengths[lengths > 64] * 2 ** (1 / 8)) + 1).all()
    assert len(np.unique(padded)) < 80
    assert (padded_length(lengths[:3072], 3072) <= 3072).all() and padded_length(np.array([3072]), 3072)[0] == 3072
    assert np.array_equal(padded_length(lengths[:500]), padded[:500])           # whatever else is in the call
    groups = inference_batches(np.array([3, 70, 9, 8, 71, 1]), 256)
    assert [(sorted(b.tolist()), pad) for b, pad in groups] == [([0, 3, 5], 8), ([2], 16), ([1], 70), ([4], 77)]
