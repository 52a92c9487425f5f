"""Training on tiny data the tests make: prepare -> shards -> samples -> train -> resume -> export -> generate."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import gpa
from gpa.audio import load_audio
from gpa.cli import main
from gpa.config import Task
from gpa.prompts import IGNORE_INDEX
from gpa.train import PrepareConfig, TrainConfig, evaluate, export, load_train_config, prepare, train
from gpa.train.data import BatchPlan, PreparedData, collate, split_records
from gpa.train.loop import Dist, build_model, lr_at
from gpa.train.state import latest_checkpoint
from gpa.weights import read_safetensors

REPO = Path(__file__).resolve().parents[1]

# Short CC0 clips of one speaker (whole sentences), and second takes of three of them for VC targets.
CLIPS = {
    "arctic_a0207_1592712443": "How much was it.",
    "arctic_a0158_1592713822": "Does that look good.",
    "arctic_a0098_1592746262": "Shall I carry you.",
    "arctic_b0228_1592536224": "You were engaged.",
}
VC_PAIRS = {
    "arctic_a0158_1592713822": "arctic_a0158_1592713801",
    "arctic_a0098_1592746262": "arctic_a0098_1592746254",
    "arctic_b0228_1592536224": "arctic_b0228_1592536232",
}
LONG = "arctic_a0001_1592748574"  # 3.3 s: cut into a segment, and too long (max_seconds 3) whole
SEGMENT = (0.3, 2.3)


@contextlib.contextmanager
def one_thread():
    """Torch on one thread: on a machine shared with other jobs, two spinning threads can be 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cathy(fixtures: Path) -> Path:
    return fixtures.parent / "data" / "cathy"


def _jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def write_manifests(root: Path, cathy: Path) -> tuple[Path, Path]:
    """A plain list and an authors' jsonl, each with good lines and every kind of bad one."""
    root.mkdir(parents=True, exist_ok=True)
    sf.write(root / "silent.wav", np.zeros(8000, np.float32), 16000)
    (root / "garbage.wav").write_bytes(b"RIFF not really a wave file")
    good = [f"{cathy / (name + '.flac')}|{text}" for name, text in CLIPS.items()]
    bad = ["missing.wav|no such file", "a line without a separator", "silent.wav|all zeros",
           "garbage.wav|cannot be decoded", f"{cathy / 'arctic_a0207_1592712443.flac'}|   "]
    (root / "list.txt").write_text("# audio|text\n" + "\n".join(good + bad) + "\n")
    long = str(cathy / f"{LONG}.flac")
    seg = {"begin_time": SEGMENT[0], "end_time": SEGMENT[1]}
    rows = [{"task": "stt", "audio": long, "text": "Author of the danger trail", **seg},
            {"task": "tts-a", "audio": long, "text": "Author of the danger trail", "ref_audio": long, **seg}]
    rows += [{"task": "vc", "audio": str(cathy / f"{src}.flac"), "text": "", "begin_time": -1, "end_time": -1,
              "ref_audio": str(cathy / f"{tgt}.flac"), "vc_audio": str(cathy / f"{tgt}.flac")}
             for src, tgt in VC_PAIRS.items()]
    rows += [{"task": "stt", "audio": long, "text": "x", "begin_time": 2.0, "end_time": 1.0},  # bad times
             {"task": "stt", "audio": long, "text": "x", "begin_time": -3, "end_time": 1.0},  # negative time
             {"task": "stt", "audio": long, "text": "x", "begin_time": 1.0, "end_time": 9.0},  # past the end
             {"task": "stt", "audio": long, "text": ""},  # empty text
             {"task": "stt", "audio": long, "text": "too long whole"},  # 3.3 s > max_seconds
             {"task": "sing", "audio": long, "text": "x"},  # unknown task
             {"task": "vc", "audio": long, "ref_audio": long},  # vc without a target
             "{not json"]
    _jsonl(root / "train.jsonl", rows)
    return root / "list.txt", root / "train.jsonl"


def prepare_config(mini_dir: Path, manifests: tuple[Path, ...], out: Path) -> PrepareConfig:
    return PrepareConfig(str(mini_dir), tuple(map(str, manifests)), str(out), shard_size=6, batch_size=4,
                         max_seconds=3.0)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, mini_dir, cathy) -> tuple[Path, Path]:
    """(manifest dir, prepared data dir)."""
    root = tmp_path_factory.mktemp("corpus")
    manifests = write_manifests(root / "manifests", cathy)
    with one_thread():
        prepare(prepare_config(mini_dir, manifests, root / "data"))
    return root / "manifests", root / "data"


@pytest.fixture(scope="session")
def data(corpus) -> PreparedData:
    return PreparedData(corpus[1])


@pytest.fixture(scope="session")
def mini(mini_dir):
    return gpa.load(mini_dir, device="cpu")


def tiny_config(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data_dir), out_dir=str(out), model="tiny", batch_size=4, max_steps=30, lr=3e-3,
                min_lr=3e-4, warmup_steps=10, eval_fraction=0.0, log_every=1, save_every=10, eval_every=0,
                keep_checkpoints=5, device="cpu", threads=1)
    return TrainConfig(**{**base, **kw})


# --- prepare ---------------------------------------------------------------------------------------------


def test_prepare_keeps_good_records_and_lists_every_bad_one_with_its_line(corpus):
    root, out = corpus
    skipped = {s["source"]: s["skipped"] for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    lst, jl = str(root / "list.txt"), str(root / "train.jsonl")
    expected = {
        f"{lst}:6": "not found", f"{lst}:7": "expected 'audio|text'", f"{lst}:8": "silent",
        f"{lst}:9": "cannot decode", f"{lst}:10": "text is empty",
        f"{jl}:6": "end_time 1.0 <= begin_time 2.0", f"{jl}:7": "bad begin_time -3", f"{jl}:8": "past the end",
        f"{jl}:9": "text is empty", f"{jl}:10": "over-length", f"{jl}:11": "unknown task 'sing'",
        f"{jl}:12": "vc_audio is missing", f"{jl}:13": "not valid JSON",
    }
    assert set(skipped) == set(expected)
    for source, reason in expected.items():
        assert reason in skipped[source], (source, skipped[source])
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["source"] for r in index] == [f"{lst}:{i}" for i in (2, 3, 4, 5)] + [f"{jl}:{i}" for i in range(1, 6)]
    assert [r["tasks"] for r in index] == [["asr", "tts"]] * 4 + [["asr"], ["tts"], ["vc"], ["vc"], ["vc"]]
    assert index[4]["begin"] == SEGMENT[0] and index[4]["end"] == SEGMENT[1]


def test_shards_are_compact_safetensors(corpus):
    out = corpus[1]
    shards = sorted(out.glob("shard-*.safetensors"))
    assert shards and not list(out.glob("*.pkl")) and not list(out.glob(".*tmp*"))
    tensors = read_safetensors(shards[0])
    assert set(tensors) <= {"glm", "semantic", "global", "vc_semantic"}
    assert all(t.dtype == torch.int16 and t.dim() == 1 for t in tensors.values())


def test_prepare_in_two_processes_writes_the_same_files(corpus, mini_dir, tmp_path, monkeypatch):
    root, one = corpus
    cfg = prepare_config(mini_dir, (root / "list.txt", root / "train.jsonl"), tmp_path / "two")
    assert len(list(one.glob("shard-*.jsonl"))) > 2
    monkeypatch.setattr(sys.modules["gpa.train.prepare"], "WORKER_SHARDS", 1)  # a new process for every shard
    report = prepare(replace(cfg, workers=2))
    assert report.records > 0 and report.shards_done_before == 0
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:  # shards, index, skips, meta and tokenizer: byte for byte
        assert (one / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert prepare(replace(cfg, workers=2)).shards_done_before == len([n for n in names if n.endswith(".jsonl")
                                                                        and n.startswith("shard-")])


def test_prepare_resumes_and_redoes_only_unfinished_shards(corpus, mini_dir, tmp_path):
    root, out = corpus
    manifests = (root / "list.txt", root / "train.jsonl")
    copy = tmp_path / "data"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    before = (copy / "index.jsonl").read_text()
    stamps = {p.name: p.stat().st_mtime_ns for p in copy.glob("shard-*")}
    n_shards = len(list(copy.glob("shard-*.jsonl")))
    report = prepare(prepare_config(mini_dir, manifests, copy))
    assert n_shards == 4 and report.shards_done_before == n_shards
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("shard-*")} == stamps  # nothing re-tokenized
    (copy / "shard-00001.jsonl").unlink()  # as if killed while writing shard 1
    report = prepare(prepare_config(mini_dir, manifests, copy))
    assert report.shards_done_before == n_shards - 1
    assert (copy / "index.jsonl").read_text() == before
    with pytest.raises(ValueError, match="other settings.*max_tokens"):
        prepare(PrepareConfig(str(mini_dir), tuple(map(str, manifests)), str(copy), shard_size=6, max_tokens=99))


# --- samples ---------------------------------------------------------------------------------------------


def _sample(data: PreparedData, suffix: str, task: Task):
    """The ``task`` sample of the record whose source line or audio file ends with ``suffix``."""
    return next(s for s in data.samples if s.task is task
                and any(data.records[s.record][k].endswith(suffix) for k in ("source", "audio")))


def test_training_samples_use_the_inference_prompts(data, mini, corpus, cathy):
    root = corpus[0]
    clip = cathy / "arctic_a0158_1592713822.flac"
    voice = mini.voice(clip)
    asr = data.prompt(_sample(data, "list.txt:3", Task.ASR))
    assert asr.prompt_ids == mini.asr_prompts([clip])[0].prompt_ids
    assert asr.target_ids == [*data.vocab.encode_text(CLIPS[clip.stem]), data.vocab.end_content, data.vocab.end]
    tts = data.prompt(_sample(data, "list.txt:3", Task.TTS))
    assert tts.prompt_ids == mini.tts_prompts([CLIPS[clip.stem]], voice)[0].prompt_ids
    vc = data.prompt(_sample(data, "train.jsonl:3", Task.VC))
    target = cathy / "arctic_a0158_1592713801.flac"
    assert vc.prompt_ids == mini.vc_prompts([clip], mini.voice(target))[0].prompt_ids
    assert vc.target_ids[:-1] == data.vocab.semantic_ids(mini.bicodec.encode_semantic([load_audio(target)])[0])
    # a segment tokenizes exactly as the same samples given to inference
    raw = load_audio(cathy / f"{LONG}.flac", normalize=False)
    segment = raw[round(SEGMENT[0] * 16000) : round(SEGMENT[1] * 16000)]
    seg_asr = data.prompt(_sample(data, "train.jsonl:1", Task.ASR))
    assert seg_asr.prompt_ids == mini.asr_prompts([(segment, 16000)])[0].prompt_ids
    assert root.is_dir()


def test_collate_masks_everything_but_the_continuation(data):
    prompts = [data.prompt(s) for s in data.samples[:3]]
    ids, labels = collate(prompts, data.vocab.pad)
    for b, p in enumerate(prompts):
        n = len(p.ids)
        assert ids[b, :n].tolist() == p.ids and (ids[b, n:] == data.vocab.pad).all()
        assert (labels[b, : p.target_start] == IGNORE_INDEX).all() and (labels[b, n:] == IGNORE_INDEX).all()
        assert labels[b, p.target_start : n].tolist() == p.target_ids


def test_cached_prompts_equal_built_ones_and_are_built_once(corpus, data):
    cached = PreparedData(corpus[1], cache_prompts=True)
    for s in data.samples:
        first = cached.prompt(s)
        assert first.ids == data.prompt(s).ids and first.target_start == data.prompt(s).target_start
        assert cached.prompt(s) is first  # the second call is the cache's


def test_time_budget_stops_saves_and_resumes(corpus, tmp_path):
    cfg = tiny_config(corpus[1], tmp_path / "run", max_steps=30, save_every=100, max_minutes=1e-6,
                      cache_prompts=True)
    first = train(cfg)
    assert first.step == 1 and len(first.losses) == 1  # the budget ran out during the first step
    assert latest_checkpoint(cfg.out_dir).name == "step-0000001"
    assert _log(tmp_path / "run")[-1]["step"] == 1
    again = train(cfg)  # resumes from step 1, spends its budget again
    assert again.step == 2 and latest_checkpoint(cfg.out_dir).name == "step-0000002"


def test_split_is_per_task_stable_and_keeps_a_training_record(data):
    held = split_records(data.records, 0.3, seed=0)
    assert held == split_records(list(reversed(data.records)), 0.3, seed=0) or True  # indices differ; ids below
    ids = {data.records[i]["id"] for i in held}
    rev = list(reversed(data.records))
    assert {rev[i]["id"] for i in split_records(rev, 0.3, seed=0)} == ids
    for task in Task:
        pool = [i for i, r in enumerate(data.records) if task.value in r["tasks"]]
        assert 1 <= sum(i in held for i in pool) < len(pool)
    assert split_records(data.records, 0.0) == set()


def test_batch_plan_is_deterministic_mixes_tasks_and_buckets_lengths(data):
    weights = {"asr": 2.0, "tts": 1.0, "vc": 1.0}
    plan = BatchPlan(data.samples, weights, batch_size=2, window=4, seed=1)
    first, pos = plan.take((0, 0), 5)
    second, _ = plan.take(pos, 3)
    again, _ = BatchPlan(data.samples, weights, 2, 4, seed=1).take((0, 0), 8)
    assert first + second == again
    epoch = [i for b in plan.epoch(0) for i in b]
    counts = {t: sum(data.samples[i].task is t for i in epoch) for t in Task}
    assert counts[Task.ASR] > counts[Task.TTS] and counts[Task.VC] > 0
    assert plan.epoch(1) != plan.epoch(0)
    only_asr = BatchPlan(data.samples, {"asr": 1.0, "tts": 0.0, "vc": 0.0}, 2, 4, seed=1)
    assert {data.samples[i].task for b in only_asr.epoch(0) for i in b} == {Task.ASR}


def test_train_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('data = "d"\nout_dir = "o"\nmax_steps = 50\nlr = 1\n[task_weights]\nasr = 3\ntts = 1\n')
    cfg = load_train_config(path, ["batch_size=2", "grad_checkpointing=true", 'lora_targets=["q_proj"]'])
    assert (cfg.max_steps, cfg.lr, cfg.batch_size, cfg.grad_checkpointing) == (50, 1.0, 2, True)
    assert cfg.task_weights == {"asr": 3.0, "tts": 1.0} and cfg.lora_targets == ("q_proj",)
    with pytest.raises(ValueError, match="unknown TrainConfig key 'max_step'"):
        load_train_config(None, ["max_step=3"])
    with pytest.raises(ValueError, match="batch_size must be int"):
        load_train_config(None, ["batch_size=2.5"])
    with pytest.raises(ValueError, match="unknown task"):
        load_train_config(None, ['task_weights={"sing": 1}'])


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


# --- training ----------------------------------------------------------------------------------------------


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(latest_checkpoint(run) / "model.safetensors")


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


OVERFIT = dict(max_steps=300, save_every=300, log_every=20, lr=2e-3, min_lr=2e-4, warmup_steps=20)
WIDER = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, max_position_embeddings=1024)


@pytest.fixture(scope="session")
def overfit(corpus, tmp_path_factory):
    """A small model trained from scratch on every sample until it has memorised them, and its export."""
    root = tmp_path_factory.mktemp("overfit")
    (root / "model.json").write_text(json.dumps(WIDER))
    cfg = tiny_config(corpus[1], root / "run", model=str(root / "model.json"), **OVERFIT)
    result = train(cfg)  # threads=1
    exported = export(root / "run", root / "exported")
    return cfg, result, exported


@pytest.mark.slow
def test_loss_of_every_task_falls_far_below_its_start(overfit, data):
    cfg, result, _ = overfit
    d = Dist()
    start = evaluate(build_model(cfg, data), data, data.samples, 8, d, torch.device("cpu"))
    model = build_model(cfg, data)
    model.load_state_dict(_weights(Path(cfg.out_dir)))
    end = evaluate(model, data, data.samples, 8, d, torch.device("cpu"))
    assert set(start) == set(end) == {"asr", "tts", "vc"}
    for task in start:
        assert end[task] < 0.05 * start[task], (task, start[task], end[task])
    assert result.step == cfg.max_steps and len(result.losses) == cfg.max_steps


@pytest.mark.slow
def test_exported_model_reproduces_its_training_examples(overfit, data, cathy):
    with one_thread():
        _reproduces(overfit[2], data, cathy)


def _reproduces(exported: Path, data: PreparedData, cathy: Path) -> None:
    model = gpa.load(exported, device="cpu")
    greedy = {"temperature": 0.0, "repetition_penalty": 1.0}
    for name, text in CLIPS.items():
        clip = cathy / f"{name}.flac"
        assert model.asr(clip, **greedy, max_new_tokens=32) == text
        codes = data.reader.codes(data.records[_sample(data, f"{name}.flac", Task.TTS).record], "semantic")
        voice = model.voice(clip)
        wav, _ = model.tts(text, voice, **greedy, max_new_tokens=len(codes) + 8)
        want = model.bicodec.decode(codes[None], voice.global_codes[None])[0].numpy()
        assert len(wav) == len(want) and np.allclose(wav, want - want.mean(), atol=1e-5)
    for src, tgt in VC_PAIRS.items():
        voice = model.voice(cathy / f"{tgt}.flac")
        codes = data.reader.codes(data.records[_sample(data, f"{src}.flac", Task.VC).record], "vc_semantic")
        wav, _ = model.vc(cathy / f"{src}.flac", voice, **greedy, max_new_tokens=len(codes) + 8)
        want = model.bicodec.decode(codes[None], voice.global_codes[None])[0].numpy()
        assert len(wav) == len(want) and np.allclose(wav, want - want.mean(), atol=1e-5)


@pytest.mark.slow
def test_exported_model_loads_in_transformers_with_equal_logits(overfit):
    transformers = pytest.importorskip("transformers")
    _, _, exported = overfit
    ours = gpa.load(exported, device="cpu").lm
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


class Killed(Exception):
    """Stands in for SIGKILL: raised from inside the loop, after the last checkpoint."""


def _train_killed_after(cfg: TrainConfig, steps: int, monkeypatch) -> None:
    from gpa.train import loop

    real, calls = loop.train_step, []

    def step(*args, **kwargs):
        if len(calls) == steps:
            raise Killed
        calls.append(1)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(loop, "train_step", step)
        with pytest.raises(Killed):
            train(cfg)


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_killed_and_resumed_run_ends_with_the_same_weights(corpus, mini_dir, tmp_path, monkeypatch):
    kw = dict(init_from=str(mini_dir), max_steps=16, save_every=6, eval_fraction=0.3, eval_every=6, grad_accum=2)
    whole = train(tiny_config(corpus[1], tmp_path / "whole", **kw))
    cfg = tiny_config(corpus[1], tmp_path / "killed", **kw)
    _train_killed_after(cfg, 9, monkeypatch)  # steps 7-9 are lost; the checkpoint of step 6 remains
    assert latest_checkpoint(cfg.out_dir).name == "step-0000006"
    resumed = train(cfg)
    assert len(resumed.losses) == 10 and resumed.losses == whole.losses[6:]
    _assert_same_weights(tmp_path / "whole", tmp_path / "killed")
    opt_a = read_safetensors(latest_checkpoint(tmp_path / "whole") / "optimizer.safetensors")
    opt_b = read_safetensors(latest_checkpoint(tmp_path / "killed") / "optimizer.safetensors")
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    evals = [row["eval"] for row in _log(tmp_path / "whole") if "eval" in row]
    assert len(evals) == 3 and all(set(e) == {"asr", "tts", "vc"} for e in evals)
    assert resumed.eval_losses == whole.eval_losses


def test_lora_trains_only_adapters_resumes_exactly_and_exports_merged(corpus, mini_dir, tmp_path, monkeypatch):
    kw = dict(init_from=str(mini_dir), lora_rank=4, lora_alpha=8.0, lora_dropout=0.2, max_steps=8, save_every=4)
    train(tiny_config(corpus[1], tmp_path / "whole", **kw))
    cfg = tiny_config(corpus[1], tmp_path / "killed", **kw)
    _train_killed_after(cfg, 5, monkeypatch)
    train(cfg)
    _assert_same_weights(tmp_path / "whole", tmp_path / "killed")  # dropout RNG restored too
    base, tuned = read_safetensors(mini_dir / "model.safetensors"), _weights(tmp_path / "whole")
    adapters = {k for k in tuned if k not in base}
    assert adapters and all(k.endswith((".lora_A", ".lora_B")) for k in adapters)
    assert all(torch.equal(tuned[k], base[k]) for k in base)
    assert all(tuned[k].abs().sum() > 0 for k in adapters if k.endswith("lora_B"))
    exported = export(tmp_path / "whole", tmp_path / "exported", link=True)
    merged = read_safetensors(exported / "model.safetensors")
    assert merged.keys() == base.keys()
    q = "model.layers.0.self_attn.q_proj"
    want = base[f"{q}.weight"] + 2.0 * tuned[f"{q}.lora_B"] @ tuned[f"{q}.lora_A"]
    assert torch.allclose(merged[f"{q}.weight"], want, atol=1e-6)
    clip = Path(json.loads((corpus[1] / "index.jsonl").read_text().splitlines()[0])["audio"])
    assert isinstance(gpa.load(exported, device="cpu").asr(clip, max_new_tokens=4), str)


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_step(corpus, data, tmp_path):
    calls = []
    model = build_model(tiny_config(corpus[1], tmp_path, grad_checkpointing=True), data)
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    model(torch.tensor([data.prompt(data.samples[0]).ids])).sum().backward()
    assert len(calls) == 2  # once forward, once again in backward (recomputation stops early, so not the mlp)
    plain = train(tiny_config(corpus[1], tmp_path / "plain", max_steps=3))
    ckpt = train(tiny_config(corpus[1], tmp_path / "ckpt", max_steps=3, grad_checkpointing=True))
    assert plain.losses == pytest.approx(ckpt.losses, rel=1e-6)
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cli_prepare_train_export_asr(mini_dir, cathy, tmp_path, capsys):
    clip = cathy / "arctic_a0207_1592712443.flac"
    (tmp_path / "list.txt").write_text(f"{clip}|{CLIPS[clip.stem]}\nmissing.wav|gone\n")
    assert main(["prepare", str(tmp_path / "list.txt"), "-o", str(tmp_path / "data"), "--checkpoint", str(mini_dir),
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out) == {"out_dir": str(tmp_path / "data"), "records": 1, "skipped": 1}
    sets = [f"data={tmp_path / 'data'}", f"out_dir={tmp_path / 'run'}", "max_steps=2", "batch_size=2",
            "eval_fraction=0", "threads=1", "device=cpu"]
    assert main(["train", "--no-progress", *_set_flags(sets)]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "model"), "--link"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "model")
    assert main(["asr", str(clip), "--model", str(tmp_path / "model"), "--max-new-tokens", "4", "--no-progress"]) == 0


def _set_flags(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_cli_train_rejects_unknown_keys(capsys):
    assert main(["train", "--set", "max_step=2"]) == 1
    assert "unknown TrainConfig key 'max_step'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_torchrun_matches_single_process(corpus, tmp_path, parallel):
    kw = dict(max_steps=8, grad_accum=2, batch_size=4, log_every=1, save_every=4, eval_fraction=0.3, eval_every=4)
    single = train(tiny_config(corpus[1], tmp_path / "single", **kw))
    same = tiny_config(corpus[1], tmp_path / "ddp", parallel=parallel, **kw).to_dict()
    sets = [f"{k}={same[k]}" for k in ("data", "out_dir", "model", "lr", "min_lr", "warmup_steps", "device", "threads",
                                       "parallel", *kw)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gpa",
           "train", "--no-progress", *_set_flags(sets)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = _weights(tmp_path / "ddp")
    shutil.rmtree(latest_checkpoint(tmp_path / "ddp"))  # resume both processes from step 4
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(torch.allclose(first[k], v, atol=1e-6) for k, v in _weights(tmp_path / "ddp").items())
    ddp = [row["loss"] for row in _log(tmp_path / "ddp") if "loss" in row][:8]  # the first run's
    assert ddp == pytest.approx(single.losses, rel=1e-4)
    held_out = [row["eval"] for row in _log(tmp_path / "ddp") if "eval" in row][-1]
    assert held_out == pytest.approx(single.eval_losses, rel=1e-4)
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert json.loads((latest_checkpoint(tmp_path / "ddp") / "trainer.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_sigkilled_process_resumes_to_the_same_weights(corpus, tmp_path):
    kw = dict(max_steps=60, save_every=3)
    whole = tiny_config(corpus[1], tmp_path / "whole", **kw)
    train(whole)
    cfg = tiny_config(corpus[1], tmp_path / "killed", **kw)
    sets = [f"{k}={v}" for k, v in cfg.to_dict().items() if k != "task_weights" and not isinstance(v, tuple)]
    proc = subprocess.Popen([sys.executable, "-m", "gpa", "train", "--no-progress", "--log-level", "ERROR",
                             *_set_flags(sets)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(cfg.out_dir) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.kill()  # SIGKILL: no handler runs, a checkpoint may be half written
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(cfg.out_dir).name != "step-0000060", "the run ended before it could be killed"
    train(cfg)
    _assert_same_weights(tmp_path / "whole", tmp_path / "killed")


def test_bf16_autocast_trains(corpus, tmp_path):
    result = train(tiny_config(corpus[1], tmp_path / "run", max_steps=3, dtype="bfloat16"))
    assert all(np.isfinite(result.losses)) and result.losses[-1] < result.losses[0]
