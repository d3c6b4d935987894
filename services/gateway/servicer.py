"""GatewayService: converts messages and delegates to the app's ZeroShot."""

from __future__ import annotations

from typing import TYPE_CHECKING

from medvlm.v1 import gateway_pb2, gateway_pb2_grpc, types_pb2
from services.domain import MedvlmError, Priority
from services.gateway.labels import LabelSet
from services.gateway.questions import Question
from services.gateway.stream import carry_questions, map_unordered
from services.gateway.zeroshot import Answer
from services.plumbing import convert
from services.plumbing.interceptors import status_of

if TYPE_CHECKING:
    from services.gateway.app import GatewayApp

def question_of(request: gateway_pb2.ClassifyRequest) -> Question:
    """What a ClassifyRequest asks (its image apart: see image_of)."""
    return Question(tuple(request.labels), request.label_set, request.template, request.top_k)


def image_of(request: gateway_pb2.ClassifyRequest) -> types_pb2.Image | None:
    """The request's image message; None when none was sent."""
    return request.image if request.HasField("image") else None


def _classify_response(answer: Answer, bundle_id: str) -> gateway_pb2.ClassifyResponse:
    """The answer with its trust fields; without a calibration `trust` stays unset."""
    response = gateway_pb2.ClassifyResponse(
        scores=[gateway_pb2.LabelScore(**vars(s)) for s in answer.scores],
        top=[gateway_pb2.LabelScore(**vars(s)) for s in answer.top],
        bundle_id=bundle_id, image_sha256=answer.image_sha256, label_set=answer.label_set)
    verdict = answer.verdict
    if verdict is not None:
        response.abstain = verdict.abstain
        reason = verdict.reason.upper() or "UNSPECIFIED"  # trust.OUT_OF_DISTRIBUTION -> ..._OUT_OF_DISTRIBUTION
        response.abstain_reason = gateway_pb2.AbstainReason.Value(f"ABSTAIN_REASON_{reason}")
        response.trust.CopyFrom(gateway_pb2.Trust(
            ood_score=verdict.ood_score, ood_threshold=verdict.ood_threshold, min_probability=verdict.min_probability,
            temperature=verdict.temperature, scope=verdict.scope, calibration_id=verdict.calibration_id))
    return response


def _summary(label_set: LabelSet, ready: bool) -> gateway_pb2.LabelSetSummary:
    return gateway_pb2.LabelSetSummary(
        name=label_set.name, version=label_set.version, description=label_set.description,
        label_count=len(label_set.labels), templates=label_set.templates, ready=ready,
        content_sha256=label_set.content_sha256,
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Converts the public messages; ZeroShot does the work."""

    def __init__(self, app: GatewayApp) -> None:
        self.app = app

    async def Classify(self, request, context):
        return await self.classify_one(request, question_of(request), context)

    async def classify_one(self, request, question: Question, context) -> gateway_pb2.ClassifyResponse:
        core = self.app.core
        answer = await core.classify(image_of(request), question, self.app.timeout(context),
                                     Priority.of(request.priority))
        return _classify_response(answer, core.model.bundle_id)

    async def ClassifyStream(self, request_iterator, context):
        self.app.core  # noqa: B018 - NotReady before the stream starts

        async def one(item):
            (correlation_id, request), question = item
            try:
                result = await self.classify_one(request, question, context)
                return gateway_pb2.ClassifyStreamResponse(correlation_id=correlation_id, result=result)
            except MedvlmError as exc:
                error = gateway_pb2.ItemError(code=status_of(exc).name, message=exc.message)
                return gateway_pb2.ClassifyStreamResponse(correlation_id=correlation_id, error=error)

        items = (((m.correlation_id, m.request), question_of(m.request)) async for m in request_iterator)
        async for response in map_unordered(carry_questions(items), one, self.app.settings.stream_window):
            yield response

    async def Similarity(self, request, context):
        core = self.app.core
        scores = await core.similarity(list(request.images), list(request.texts), request.template,
                                       self.app.timeout(context), Priority.of(request.priority))
        rows = [
            gateway_pb2.SimilarityRow(cosine=c.tolist(), probabilities=p.tolist(), image_sha256=d)
            for c, p, d in zip(scores.cosine, scores.probabilities, scores.image_digests, strict=True)
        ]
        return gateway_pb2.SimilarityResponse(rows=rows, bundle_id=core.model.bundle_id)

    async def EmbedImages(self, request, context):
        result = await self.app.core.embed_images(list(request.images), self.app.timeout(context),
                                                  Priority.of(request.priority))
        return types_pb2.EmbedImagesResponse(
            embeddings=convert.embeddings(result.vectors, result.digests), bundle_id=result.bundle_id
        )

    async def EmbedTexts(self, request, context):
        core = self.app.core
        texts = list(request.texts)
        vectors = await core.embed_texts(texts, self.app.timeout(context), Priority.of(request.priority))
        digests = [convert.sha256_hex(t.encode("utf-8")) for t in texts]
        return types_pb2.EmbedTextsResponse(
            embeddings=convert.embeddings(vectors, digests), bundle_id=core.model.bundle_id
        )

    async def GetModelInfo(self, request, context):
        return types_pb2.GetModelInfoResponse(model=self.app.info)

    async def ListLabelSets(self, request, context):
        sets = self.app.core.sets
        return gateway_pb2.ListLabelSetsResponse(
            label_sets=[_summary(s, sets.ready(ref)) for ref, s in sets.catalogue.sets.items()],
            refused=[gateway_pb2.RefusedLabelSetFile(file=r.file, problem=r.problem) for r in sets.catalogue.refused],
        )

    async def GetLabelSet(self, request, context):
        sets = self.app.core.sets
        label_set = sets.catalogue.resolve(request.label_set)
        return gateway_pb2.GetLabelSetResponse(
            label_set=_summary(label_set, sets.ready(label_set.ref)),
            labels=[gateway_pb2.Label(name=x.name, code=x.code, synonyms=x.synonyms) for x in label_set.labels],
        )
