"""Runs inside the ``dynamo`` peer environment: NVIDIA Dynamo's ``RadixTree`` over a workload written by
``kvtier.bench.router`` (a pickle of plain lists), one JSON object on stdout.

Workload: ``{"replay": [op...], "latency": {"setup": [op...], "queries": [[hash...]...]}, "block_size": n,
"tokens": [[int...]...]}`` with ops ``("store", worker, parent_or_None, [hash...])``,
``("remove", worker, [hash...])`` and ``("find", [hash...])``. Events are serialised to Dynamo's JSON before
the clock starts; a block's ``tokens_hash`` is its chained hash, which keys the tree the same way.
"""

import json
import pickle
import sys
import time


def encode(ops):
    out, event_id = [], 0
    for op in ops:
        event_id += 1
        if op[0] == "store":
            blocks = [{"block_hash": h, "tokens_hash": h} for h in op[3]]
            data = {"stored": {"parent_hash": op[2], "blocks": blocks}}
        elif op[0] == "remove":
            data = {"removed": {"block_hashes": op[2]}}
        else:
            out.append(("find", op[1]))
            continue
        out.append((op[0], op[1], json.dumps({"event_id": event_id, "data": data}).encode()))
    return out


def replay(tree, encoded, answers):
    """Block operations per second, wall and CPU (the tree works on a second thread), and refused events."""
    refused = ops = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for item in encoded:
        if item[0] == "find":
            scores = tree.find_matches(item[1], early_exit=False).scores
            ops += len(item[1])
            if answers is not None:
                answers.append({str(w): n for (w, _rank), n in scores.items()})
        else:
            try:
                tree.apply_event(item[1], item[2])
            except RuntimeError:  # a parent or block it does not know: Dynamo skips the event
                refused += 1
    return time.perf_counter() - wall, time.process_time() - cpu, refused


def main():
    from dynamo._core import RadixTree, compute_block_hash_for_seq

    with open(sys.argv[1], "rb") as f:
        workload = pickle.load(f)
    block_ops = sum(len(op[-1]) for op in workload["replay"])
    answers = []
    tree = RadixTree()
    wall, cpu, refused = replay(tree, encode(workload["replay"]), answers)
    latency_tree = RadixTree()
    replay(latency_tree, encode(workload["latency"]["setup"]), None)
    samples = []
    for keys in workload["latency"]["queries"]:
        t0 = time.perf_counter_ns()
        latency_tree.find_matches(keys, early_exit=False)
        samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    local = [compute_block_hash_for_seq(tokens, workload["block_size"]) for tokens in workload["tokens"]]
    print(json.dumps({"block_ops_per_s": block_ops / wall, "block_ops_per_cpu_s": block_ops / cpu,
                      "events": sum(1 for op in workload["replay"] if op[0] != "find"), "wall_s": wall,
                      "cpu_s": cpu, "refused_events": refused, "answers": answers,
                      "find_p50_us": samples[len(samples) // 2] / 1e3,
                      "find_p99_us": samples[int(len(samples) * 0.99)] / 1e3, "local_hashes": local}))


if __name__ == "__main__":
    main()
