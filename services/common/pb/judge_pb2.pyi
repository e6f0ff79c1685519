from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dimension(_message.Message):
    __slots__ = ("name", "description", "scale_min", "scale_max")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SCALE_MIN_FIELD_NUMBER: _ClassVar[int]
    SCALE_MAX_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    scale_min: int
    scale_max: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., scale_min: _Optional[int] = ..., scale_max: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("id", "prompt", "response", "rubric", "dimensions", "method")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    RUBRIC_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt: str
    response: str
    rubric: str
    dimensions: _containers.RepeatedCompositeFieldContainer[Dimension]
    method: str
    def __init__(self, id: _Optional[str] = ..., prompt: _Optional[str] = ..., response: _Optional[str] = ..., rubric: _Optional[str] = ..., dimensions: _Optional[_Iterable[_Union[Dimension, _Mapping]]] = ..., method: _Optional[str] = ...) -> None: ...

class DimensionScore(_message.Message):
    __slots__ = ("name", "score", "rationale", "signal")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    score: float
    rationale: str
    signal: float
    def __init__(self, name: _Optional[str] = ..., score: _Optional[float] = ..., rationale: _Optional[str] = ..., signal: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("id", "scores", "overall", "rationale", "fluency", "backend", "rubric", "method")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    OVERALL_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    FLUENCY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RUBRIC_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    id: str
    scores: _containers.RepeatedCompositeFieldContainer[DimensionScore]
    overall: float
    rationale: str
    fluency: float
    backend: str
    rubric: str
    method: str
    def __init__(self, id: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[DimensionScore, _Mapping]]] = ..., overall: _Optional[float] = ..., rationale: _Optional[str] = ..., fluency: _Optional[float] = ..., backend: _Optional[str] = ..., rubric: _Optional[str] = ..., method: _Optional[str] = ...) -> None: ...

class ScoreBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreRequest, _Mapping]]] = ...) -> None: ...

class ScoreBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResponse, _Mapping]]] = ...) -> None: ...

class ListRubricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRubricsResponse(_message.Message):
    __slots__ = ("rubrics",)
    RUBRICS_FIELD_NUMBER: _ClassVar[int]
    rubrics: _containers.RepeatedCompositeFieldContainer[Rubric]
    def __init__(self, rubrics: _Optional[_Iterable[_Union[Rubric, _Mapping]]] = ...) -> None: ...

class Rubric(_message.Message):
    __slots__ = ("name", "dimensions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    dimensions: _containers.RepeatedCompositeFieldContainer[Dimension]
    def __init__(self, name: _Optional[str] = ..., dimensions: _Optional[_Iterable[_Union[Dimension, _Mapping]]] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("id", "prompt", "response_a", "response_b", "rubric", "dimensions", "method")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_A_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_B_FIELD_NUMBER: _ClassVar[int]
    RUBRIC_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt: str
    response_a: str
    response_b: str
    rubric: str
    dimensions: _containers.RepeatedCompositeFieldContainer[Dimension]
    method: str
    def __init__(self, id: _Optional[str] = ..., prompt: _Optional[str] = ..., response_a: _Optional[str] = ..., response_b: _Optional[str] = ..., rubric: _Optional[str] = ..., dimensions: _Optional[_Iterable[_Union[Dimension, _Mapping]]] = ..., method: _Optional[str] = ...) -> None: ...

class DimensionVerdict(_message.Message):
    __slots__ = ("name", "prob_a", "winner", "prob_a_shown_first", "prob_a_shown_second", "rationale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROB_A_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    PROB_A_SHOWN_FIRST_FIELD_NUMBER: _ClassVar[int]
    PROB_A_SHOWN_SECOND_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    prob_a: float
    winner: str
    prob_a_shown_first: float
    prob_a_shown_second: float
    rationale: str
    def __init__(self, name: _Optional[str] = ..., prob_a: _Optional[float] = ..., winner: _Optional[str] = ..., prob_a_shown_first: _Optional[float] = ..., prob_a_shown_second: _Optional[float] = ..., rationale: _Optional[str] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("id", "dimensions", "prob_a", "winner", "position_bias", "backend", "rubric", "method", "rationale")
    ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    PROB_A_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    POSITION_BIAS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RUBRIC_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    id: str
    dimensions: _containers.RepeatedCompositeFieldContainer[DimensionVerdict]
    prob_a: float
    winner: str
    position_bias: float
    backend: str
    rubric: str
    method: str
    rationale: str
    def __init__(self, id: _Optional[str] = ..., dimensions: _Optional[_Iterable[_Union[DimensionVerdict, _Mapping]]] = ..., prob_a: _Optional[float] = ..., winner: _Optional[str] = ..., position_bias: _Optional[float] = ..., backend: _Optional[str] = ..., rubric: _Optional[str] = ..., method: _Optional[str] = ..., rationale: _Optional[str] = ...) -> None: ...
