//! `GET /v1/models`: the route aliases (`default` first), the concrete
//! models the generation service serves, then the embedding model.

use axum::{Json, extract::State, response::IntoResponse};

use super::AppState;
use crate::{
    ApiError,
    openai::{ModelList, ModelObject},
};

/// The handler. Errors with 503 when generation cannot be asked.
pub async fn list_models(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let mut data: Vec<ModelObject> = state
        .engine
        .router()
        .model_names()
        .into_iter()
        .map(|id| ModelObject {
            id,
            object: "model",
            created: 0,
            owned_by: "moltbot".to_owned(),
        })
        .collect();
    for m in state.engine.served_models().await? {
        if let Some(existing) = data.iter_mut().find(|d| d.id == m.name) {
            existing.owned_by = m.backend.clone();
            continue;
        }
        data.push(ModelObject {
            id: m.name,
            object: "model",
            created: 0,
            owned_by: m.backend,
        });
    }
    data.push(ModelObject {
        id: super::EMBEDDING_MODEL.to_owned(),
        object: "model",
        created: 0,
        owned_by: "moltbot".to_owned(),
    });
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}
