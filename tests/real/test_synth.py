"""`ragkern synth` on SmolLM2 end to end: four short documents -> kept pairs -> `ragkern train --config` on its
output unchanged (two steps)."""

import json

import yaml

from ragkern.cli import main
from ragkern.data import load_records

# Plain facts SmolLM2-135M-Instruct asks and answers about (checked by hand: 3 of 19 candidates kept, in 3
# documents; greedy decoding, so the same every run up to floating-point ties).
DOCS = [
    {
        "id": "kelton",
        "title": "Kelton",
        "text": "Kelton is a small harbour town on the north coast. It was founded by the fisher Mara Vell in the "
        "year 1512. The town is known for its red lighthouse, which was built in 1790.",
    },
    {
        "id": "tarn",
        "title": "Tarn",
        "text": "Tarn is a river town in the eastern hills. The river Lumen runs through Tarn. Its market sells "
        "wool and cheese every Sunday, and its old mill grinds barley.",
    },
    {
        "id": "orla",
        "title": "Orla",
        "text": "Orla is a mountain village in the south. Its people keep goats and grow apples. The village "
        "school was opened in 1901 by the teacher Ivo Brandt.",
    },
    {
        "id": "fenwick",
        "title": "Fenwick",
        "text": "Fenwick is a city built on a lake. Its bridges are made of stone. The city library holds four "
        "thousand old maps, and the mayor is Lena Hart.",
    },
]


def test_synth_then_train_on_its_output(smollm2_path, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    out = tmp_path / "synth" / "train.jsonl"
    argv = ["synth", str(corpus), "--model", str(smollm2_path), "--out", str(out)]
    assert main([*argv, "--min-tokens", "8", "--heldout-fraction", "0.25", "--batch-size", "4"]) == 0
    report = json.loads((tmp_path / "synth" / "train.report.json").read_text())
    assert report["chunks"] == 4 and report["chunks_generated"] == 4
    assert report["kept"] >= 2, report  # SmolLM2 yields usable pairs here, and the filters keep them
    assert report["kept"] + sum(report["dropped"].values()) == report["candidates"]
    assert report["train"] >= 1 and report["train"] + report["heldout"] == report["kept"]
    for record in load_records(out, kinds=("raft",)):
        oracle = record["passages"][record["oracle"][0]]["text"] if record["oracle"] else None
        assert oracle is None or record["answer"].lower().strip(".") in oracle.lower()  # grounded: a span
    assert "kept" in capsys.readouterr().out

    # re-running resumes: nothing is generated again
    assert main([*argv, "--min-tokens", "8", "--heldout-fraction", "0.25", "--batch-size", "4"]) == 0
    assert json.loads((tmp_path / "synth" / "train.report.json").read_text())["chunks_generated"] == 0

    config = tmp_path / "synth" / "train.yaml"
    assert yaml.safe_load(config.read_text())["sources"] == [{"kind": "raft", "path": str(out.resolve())}]
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--max_steps",
                "2",
                "--output_dir",
                str(run),
                "--use_cpu",
                "true",
            ]
        )
        == 0
    )
    summary = json.loads((run / "ragkern_run.json").read_text())
    assert summary["metrics"]["examples"] == report["train"] and summary["training"]["max_steps"] == 2
    assert (run / "adapter_model.safetensors").is_file()
