"""OpenAI's model routes: /v1/models, /v1/models/{id}, and /models/{name}/v1/models.

/v1/completions and /v1/chat/completions are SGLang's own handlers (`sglang_openai.py`);
SGLang's model routes know one model, so these list every hosted one, as SGLang's
`ModelCard`s.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sglang.srt.entrypoints.openai import protocol as oai

from crosspool_sgl.managers.errors import RequestError
from crosspool_sgl.managers.hosted_models import HostedModels


def build_openai_router(hosted: HostedModels) -> APIRouter:
    router = APIRouter()

    def card(name: str) -> oai.ModelCard:
        m = hosted.infos[name]
        return oai.ModelCard(id=m.name, root=m.path, owned_by="crosspool-sgl", max_model_len=m.context_len)

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return oai.ModelList(data=[card(name) for name in hosted]).model_dump()

    @router.get("/models/{model_name}/v1/models")
    async def list_one_model(model_name: str) -> dict[str, Any]:
        """A model's prefix answers like SGLang's one-model server (clients probe it for readiness)."""
        return oai.ModelList(data=[card(hosted.resolve_model(model_name))]).model_dump()

    @router.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        """One model's card (`client.models.retrieve`); an unknown id is a 404 with OpenAI's body."""
        if not model_id:  # resolve_model reads an empty name as the default model
            raise RequestError("The model `` does not exist", 404, "NotFoundError", "model")
        return card(hosted.resolve_model(model_id)).model_dump()

    return router
