"""Judge service, OpenAI-compatible backend: a real judge server pointed at an OpenAI-shaped HTTP API.

`FakeOpenAI` below stands in for an EXTERNAL chat-completions API (OpenAI, or any vLLM/TGI server); it is
not a tokenmill component. Its reply is chosen by a marker such as `[[mode:fenced]]` in the response text
being judged, so one judge server exercises every case: raw JSON, a fenced block, prose with `name: 4/5`,
a reply with no scores at all (clear FAILED_PRECONDITION, no crash), transient 503/429 that are retried,
a 503 that never ends (UNAVAILABLE), a reply slower than the timeout (DEADLINE_EXCEEDED, not
retried) and a 401 (FAILED_PRECONDITION naming the key variable). For Compare it plays a judge that always
prefers the response shown first (both-order averaging must cancel that) and a fair one; and a server that
refuses `response_format` (the judge asks again without it).
The test against tokenmill's own gateway HTTP endpoint is tests/test_gateway*.py's business once it lands.
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import grpc
import pytest
from fake_openai import FakeOpenAI
from judge_support import JudgeProcess

from services.common.pb import judge_pb2, judge_pb2_grpc
from services.judge.backends.openai_compat import parse_scores
from services.judge.rubrics import RubricRegistry
from services.judge.types import BackendError

PROMPT = "Write a single paragraph moral story for children about a shy turtle who learns the value of courage."
STORY = "A shy turtle named Toby was afraid of the pond, until he helped a duckling and found his courage."
KEY = "sk-test-judge-key"


@pytest.fixture(scope="module")
def fake_api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(scope="module")
def judge(tmp_path_factory, fake_api):
    # no --judge-model: the backend takes the first model of GET /models
    rubrics = tmp_path_factory.mktemp("rubrics")  # --rubrics: an extra folder of rubric files
    (rubrics / "brevity.yaml").write_text(
        "name: brevity\ndimensions:\n  - name: brevity\n    description: Short and to the point.\n"
        "    scale: [0, 4]\n")
    server = JudgeProcess(tmp_path_factory.mktemp("judge-openai"), "--judge-backend", "openai",
                          "--judge-url", fake_api, "--judge-max-retries", "2", "--judge-timeout-s", "1",
                          "--rubrics", str(rubrics), env={"TOKENMILL_JUDGE_API_KEY": KEY})
    channel = grpc.insecure_channel(server.address)
    yield judge_pb2_grpc.JudgeStub(channel)
    channel.close()
    server.stop()


def score(judge, mode: str, **kw) -> judge_pb2.ScoreResponse:
    return judge.Score(judge_pb2.ScoreRequest(id=mode, prompt=PROMPT, response=f"{STORY} [[mode:{mode}]]", **kw),
                       timeout=60)


EXPECTED = {"moral_clarity": 0.75, "age_appropriateness": 1.0, "narrative_coherence": 0.5, "relevance": 1.0}


@pytest.mark.parametrize("mode", ["json", "fenced", "list", "prose"])
def test_parses_scores(judge, mode):
    res = score(judge, mode)
    assert res.backend == "openai" and res.rubric == "children-story" and res.id == mode
    assert {s.name: s.score for s in res.scores} == EXPECTED
    assert res.overall == pytest.approx(0.8125)
    assert not res.HasField("fluency")  # an API cannot give the likelihood of a given text
    if mode == "json":
        assert res.rationale == "Clear moral, gentle tone."
    if mode == "list":
        assert res.scores[0].rationale == "moral_clarity ok"


def test_fractions_are_taken_as_normalised(judge):
    res = score(judge, "fraction")  # the seed asked gpt-5-mini for 0.0-1.0 directly
    assert [s.score for s in res.scores] == [0.85, 0.97, 0.72, 0.94]


def test_sends_key_and_model(judge):
    score(judge, "json")
    assert FakeOpenAI.auth and FakeOpenAI.auth[-1] == f"Bearer {KEY}"


@pytest.mark.parametrize(("mode", "code", "needles"), [
    ("nojson", grpc.StatusCode.FAILED_PRECONDITION, ["no usable score for moral_clarity", "I am sorry"]),
    ("partial", grpc.StatusCode.FAILED_PRECONDITION, ["no usable score for age_appropriateness"]),
    ("notchat", grpc.StatusCode.FAILED_PRECONDITION, ["not a chat completion"]),
    ("unauthorized", grpc.StatusCode.FAILED_PRECONDITION, ["401", "TOKENMILL_JUDGE_API_KEY"]),
    ("down", grpc.StatusCode.UNAVAILABLE, ["failed 3 times", "503"]),
    ("slow", grpc.StatusCode.DEADLINE_EXCEEDED, ["did not answer within 1s"]),
])
def test_unusable_replies_are_clear_errors(judge, mode, code, needles):
    with pytest.raises(grpc.RpcError) as info:
        score(judge, mode)
    assert info.value.code() == code, info.value.details()
    for needle in needles:
        assert needle in info.value.details(), info.value.details()
    assert FakeOpenAI.calls[mode] == (3 if mode == "down" else 1)  # only transient errors are retried
    assert score(judge, "json").scores  # and the judge keeps serving


@pytest.mark.parametrize("mode", ["flaky503", "ratelimit"])
def test_transient_errors_are_retried(judge, mode):
    res = score(judge, mode)
    assert {s.name: s.score for s in res.scores} == EXPECTED
    assert FakeOpenAI.calls[mode] == 2  # one failure, one retry


def test_batch_and_stream(judge):
    items = [judge_pb2.ScoreRequest(id=f"b{i}", prompt=PROMPT, response=f"{STORY} [[mode:{m}]]")
             for i, m in enumerate(["json", "fenced", "prose"])]
    batch = judge.ScoreBatch(judge_pb2.ScoreBatchRequest(items=items), timeout=60).results
    assert [r.id for r in batch] == ["b0", "b1", "b2"]
    assert all({s.name: s.score for s in r.scores} == EXPECTED for r in batch)
    assert sorted(r.id for r in judge.ScoreStream(iter(items), timeout=60)) == ["b0", "b1", "b2"]


def test_inline_scale_and_validation(judge):
    res = score(judge, "json", dimensions=[judge_pb2.Dimension(name="relevance", description="on topic",
                                                               scale_min=1, scale_max=10)])
    assert [(s.name, s.score) for s in res.scores] == [("relevance", pytest.approx(4 / 9))]
    with pytest.raises(grpc.RpcError) as info:
        judge.Score(judge_pb2.ScoreRequest(prompt=PROMPT, response=""), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_extra_rubric_folder(judge):
    names = [r.name for r in judge.ListRubrics(judge_pb2.ListRubricsRequest()).rubrics]
    assert {"brevity", "children-story", "helpfulness"} <= set(names)
    res = judge.Score(judge_pb2.ScoreRequest(prompt=PROMPT, response=STORY + " [[mode:brevity]]", rubric="brevity"),
                      timeout=60)
    assert res.rubric == "brevity" and [(s.name, s.score) for s in res.scores] == [("brevity", 0.75)]


def test_broken_rubric_file_stops_the_judge_with_a_message(tmp_path, fake_api):
    (tmp_path / "bad.yaml").write_text("name: bad\ndimensions:\n  - name: x\n    scale: [5, 1]\n")
    with pytest.raises(RuntimeError) as info:
        JudgeProcess(tmp_path, "--judge-backend", "openai", "--judge-url", fake_api, "--rubrics", str(tmp_path),
                     timeout_s=60)
    assert "scale_min must be below scale_max" in str(info.value) and "bad.yaml" in str(info.value)


def compare(judge, mode: str, a: str, b: str, **kw) -> judge_pb2.CompareResponse:
    return judge.Compare(judge_pb2.CompareRequest(id=mode, prompt=f"{PROMPT} [[mode:{mode}]]", response_a=a,
                                                  response_b=b, **kw), timeout=60)


def test_compare_cancels_a_position_biased_judge(judge):
    n = FakeOpenAI.calls["verdict_first"]
    res = compare(judge, "verdict_first", STORY, STORY + " The end.")
    assert FakeOpenAI.calls["verdict_first"] == n + 2  # asked in both orders
    assert res.backend == "openai" and res.method == "geval" and res.rubric == "children-story"
    assert res.prob_a == pytest.approx(0.5) and res.winner == "tie"  # "A" both times: no information
    assert res.position_bias == pytest.approx(0.8)  # 0.9 for A shown first, 0.1 when B was shown first
    for d in res.dimensions:
        assert (d.prob_a_shown_first, d.prob_a_shown_second) == (pytest.approx(0.9), pytest.approx(0.1))
    assert FakeOpenAI.formats[-1] == "json_schema"  # structured output asked for


def test_compare_fair_judge_is_symmetric(judge):
    good, bad = STORY + " [[good]]", "A turtle. The end."
    ab, ba = compare(judge, "verdict_good", good, bad), compare(judge, "verdict_good", bad, good)
    assert ab.prob_a == pytest.approx(0.9) and ab.winner == "a" and ab.position_bias == pytest.approx(0.0)
    assert ab.prob_a + ba.prob_a == pytest.approx(1.0, abs=0.02) and ba.winner == "b"
    assert "A reads better" in ab.rationale


def test_likelihood_method_needs_the_local_backend(judge):
    with pytest.raises(grpc.RpcError) as info:
        score(judge, "json", method="likelihood")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs the local backend" in info.value.details()
    assert score(judge, "json", method="geval").method == "geval"


# ---------------------------------------------------------------- the parser on its own
RUBRIC = RubricRegistry().get("children-story")


@pytest.mark.parametrize("text", [
    '{"moral_clarity": 4, "age_appropriateness": "5", "narrative_coherence": 3.0, "relevance": "5/5"}',
    '<think>hmm {"x": 1}</think>{"scores": {"Moral Clarity": 4, "age-appropriateness": 5, '
    '"narrative coherence": 3, "relevance": {"score": 5}}}',
    'Scores follow. {"ratings": {"moral_clarity": 4, "age_appropriateness": 5, "narrative_coherence": 3, '
    '"relevance": 5}} Done.',
    "moral_clarity: 4\nage_appropriateness: 5\nnarrative_coherence: 3\nrelevance: 5",
])
def test_parse_scores_variants(text):
    scores, _ = parse_scores(text, RUBRIC)
    assert {s.name: s.score for s in scores} == EXPECTED


@pytest.mark.parametrize("text", ["", "no numbers here", '{"scores": {}}', "moral_clarity: high"])
def test_parse_scores_unusable(text):
    with pytest.raises(BackendError) as info:
        parse_scores(text, RUBRIC)
    assert info.value.code == "FAILED_PRECONDITION"


def test_server_without_structured_output(judge):
    """Last in this file: after a 400 naming response_format the judge stops sending it."""
    n = len(FakeOpenAI.formats)
    res = score(judge, "noformat")
    assert {s.name: s.score for s in res.scores} == EXPECTED
    assert FakeOpenAI.formats[n:] == ["json_schema", ""]
    score(judge, "json")
    assert FakeOpenAI.formats[-1] == ""
