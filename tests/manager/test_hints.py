import pytest

from kvtier.hints import AgentHints, HintError, Pin, TokenRange, block_plan, hints_from_body, parse_hints


def test_parse_from_dict_and_json():
    body = {"session_id": "abc", "pins": [{"target": "system_and_tools", "lease_s": 30}], "prefix_tokens": 100,
            "ephemeral": [{"start": 200, "end": 260}], "next_call_delay_s": 4.5, "osl": 300,
            "priorities": [{"range": {"start": 0, "end": 50}, "priority": 80, "duration_s": 60}], "prefetch": True}
    hints = parse_hints(body)
    assert hints.session_id == "abc" and hints.pins[0].lease_s == 30 and hints.prefetch
    import json
    assert parse_hints(json.dumps(body)) == hints
    assert hints_from_body({"nvext": {"agent_hints": body}}) == hints
    assert hints_from_body({"kv_transfer_params": {"agent_hints": body}}) == hints
    assert hints_from_body({"messages": []}) == AgentHints()


@pytest.mark.parametrize("bad, match", [
    ({"sesion_id": "typo"}, "sesion_id"),
    ({"priority": 120, "priority_duration_s": 1}, "0..100"),
    ({"priority": 70, "priority_duration_s": 0}, "priority_duration_s"),
    ({"session_id": "s" * 257}, "session_id"),
    ({"session_id": ""}, "session_id"),
    ({"ephemeral": [{"start": i, "end": i + 1} for i in range(65)]}, "ephemeral"),
    ({"pins": [{"range": {"start": 0, "end": 1}, "lease_s": float("inf")}]}, "lease_s"),
    ({"next_call_delay_s": float("nan")}, "next_call_delay_s"),
    ({"osl": -1}, "osl"),
    ({"latency_sensitivity": "high"}, "latency_sensitivity"),
    ({"speculative_prefill": True}, "speculative_prefill"),
    ({"ephemeral": [{"start": 5, "end": 5}]}, "start < end"),
    ({"pins": [{"lease_s": 3}]}, "exactly one"),
    ({"pins": [{"target": "system_and_tools"}]}, "prefix_tokens"),
    ({"pins": [{"target": "everything", "lease_s": 1}]}, "target"),
    ({"next_call_delay_s": -1}, "negative"),
    ({"pins": [{"range": {"start": 0, "end": 4, "extra": 1}}]}, "extra"),
])
def test_bad_hints_are_clear_errors(bad, match):
    with pytest.raises(HintError, match=match):
        parse_hints(bad)


def test_hints_are_bounded_in_encoded_size():
    many = {"priorities": [{"range": {"start": i, "end": i + 1}, "priority": 60, "duration_s": 1.5} for i in range(1000, 1064)]}
    with pytest.raises(HintError, match="4096 bytes"):
        parse_hints(many)
    with pytest.raises(HintError, match="4096 bytes"):
        parse_hints("{" + " " * 5000 + "}")


def test_a_request_priority_without_a_duration_holds_five_minutes():
    plan = block_plan(parse_hints({"priority": 70}), num_blocks=2, block_size=16)
    assert plan.priorities == [([0, 1], 70, 300.0)]


def test_a_final_request_renews_no_pins():
    hints = parse_hints({"session_final": True, "pins": [{"range": {"start": 0, "end": 32}}]})
    assert block_plan(hints, num_blocks=2, block_size=16).pins == {}


def test_not_json_is_an_error():
    with pytest.raises(HintError):
        parse_hints("{not json")
    with pytest.raises(HintError):
        parse_hints(42)


def test_block_plan_maps_token_ranges_to_blocks():
    hints = AgentHints(prefix_tokens=33, pins=[Pin(target="system_and_tools"), Pin(range=TokenRange(64, 65), lease_s=9)],
                       ephemeral=[TokenRange(100, 140)], priority=20, priority_duration_s=5)
    plan = block_plan(hints, num_blocks=8, block_size=16)
    assert plan.pins == {None: [0, 1, 2], 9: [4]}
    assert plan.ephemeral == [6, 7, 8][:2]          # tokens 100..139 overlap blocks 6 and 7 (8 does not exist)
    assert plan.priorities == [(list(range(8)), 20, 5.0)]
    with pytest.raises(HintError):
        block_plan(hints, 8, 0)
