//! The HTTP routes of the REST API (`/v1/...`) and the OpenAPI document describing them.

use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferro_api::rest::{
    ApiErrorBody, CreateVm, EditVm, HostInfo, Nic, Operation, OperationState, RestartPolicy, Vm,
    VmEvent, VmState,
};
use ferro_api::storage::{CloneVm, CreateTemplate, Image, ImportImage, Template};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::error::{error_response, DaemonError};
use crate::supervisor::Supervisor;
use crate::{images, ops, templates};

type ApiResult<T> = Result<T, DaemonError>;

fn bad_json(e: JsonRejection) -> DaemonError {
    DaemonError::BadRequest(format!("invalid request body: {}", e.body_text()))
}

fn bad_query(e: QueryRejection) -> DaemonError {
    DaemonError::BadRequest(format!("invalid query: {}", e.body_text()))
}

/// The OpenAPI document of the API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Ferrovisor daemon API",
        description = "VMs on one host: define, start, stop, watch."
    ),
    paths(
        host,
        list_vms,
        create_vm,
        get_vm,
        edit_vm,
        delete_vm,
        start_vm,
        stop_vm,
        reboot_vm,
        pause_vm,
        resume_vm,
        vm_events,
        vm_log,
        vm_console,
        clone_vm,
        list_images,
        import_image,
        delete_image,
        list_templates,
        create_template,
        delete_template,
        list_operations,
        get_operation
    ),
    components(schemas(
        ApiErrorBody,
        CloneVm,
        CreateVm,
        CreateTemplate,
        Image,
        ImportImage,
        Template,
        EditVm,
        HostInfo,
        Nic,
        Operation,
        OperationState,
        RestartPolicy,
        Vm,
        VmEvent,
        VmState
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document as pretty JSON (what `docs/openapi.json` holds).
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::snapshots::SnapshotDoc::openapi());
    doc.merge(crate::migrate::MigrateDoc::openapi());
    doc.info.version = "1".to_string();
    doc.info.license = None;
    doc.to_pretty_json().unwrap_or_default() + "\n"
}

/// The router of every route.
pub fn router(sup: Supervisor) -> Router {
    Router::new()
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi_json()) }),
        )
        .route("/v1/host", get(host))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route(
            "/v1/vms/{name}",
            get(get_vm).patch(edit_vm).delete(delete_vm),
        )
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/reboot", post(reboot_vm))
        .route("/v1/vms/{name}/pause", post(pause_vm))
        .route("/v1/vms/{name}/resume", post(resume_vm))
        .route("/v1/vms/{name}/events", get(vm_events))
        .route("/v1/vms/{name}/log", get(vm_log))
        .route("/v1/vms/{name}/console", get(vm_console))
        .route("/v1/vms/{name}/clone", post(clone_vm))
        .route("/v1/images", get(list_images).post(import_image))
        .route("/v1/images/{name}", axum::routing::delete(delete_image))
        .route("/v1/operations", get(list_operations))
        .route("/v1/operations/{id}", get(get_operation))
        .route("/v1/templates", get(list_templates).post(create_template))
        .route(
            "/v1/templates/{name}",
            axum::routing::delete(delete_template),
        )
        .merge(crate::snapshots::router())
        .merge(crate::migrate::router())
        .fallback(|m: axum::http::Method, uri: axum::http::Uri| async move {
            error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route {m} {uri} (see GET /openapi.json)"),
            )
        })
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(sup)
}

/// Makes every error a JSON `{"code", "message"}`, including the ones axum produces itself
/// (unknown route, wrong method).
async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (code, message) = match status {
        StatusCode::NOT_FOUND => (
            "not_found",
            format!("no route {method} {uri} (see GET /openapi.json)"),
        ),
        StatusCode::BAD_REQUEST => ("bad_request", format!("{method} {uri}: bad request")),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            format!("{method} is not allowed on {uri}"),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => ("too_large", "request body is too large".to_string()),
        _ => (
            "error",
            status.canonical_reason().unwrap_or("error").to_string(),
        ),
    };
    error_response(status, code, message)
}

/// Host and daemon facts.
#[utoipa::path(get, path = "/v1/host", responses((status = 200, body = HostInfo)))]
async fn host(State(sup): State<Supervisor>) -> ApiResult<Json<HostInfo>> {
    let (vms, schema) = sup.store(|s| Ok((s.list()?.len(), s.schema_version()?)))?;
    Ok(Json(HostInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        data_dir: sup.0.data_dir.clone(),
        vms: u32::try_from(vms).unwrap_or(u32::MAX),
        schema_version: schema,
        bridge: sup.0.net.bridge.clone(),
        bridge_address: sup.0.net.cidr(),
    }))
}

/// Every VM.
#[utoipa::path(get, path = "/v1/vms", responses((status = 200, body = Vec<Vm>)))]
async fn list_vms(State(sup): State<Supervisor>) -> ApiResult<Json<Vec<Vm>>> {
    Ok(Json(ops::list(&sup)?))
}

/// Defines a VM; nothing is stored when it fails.
#[utoipa::path(post, path = "/v1/vms", request_body = CreateVm, responses(
    (status = 201, body = Vm), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn create_vm(
    State(sup): State<Supervisor>,
    body: Result<Json<CreateVm>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    let Json(req) = body.map_err(bad_json)?;
    Ok((StatusCode::CREATED, Json(ops::create(&sup, req).await?)))
}

/// One VM.
#[utoipa::path(get, path = "/v1/vms/{name}", params(("name" = String, Path)), responses(
    (status = 200, body = Vm), (status = 404, body = ApiErrorBody)))]
async fn get_vm(State(sup): State<Supervisor>, Path(name): Path<String>) -> ApiResult<Json<Vm>> {
    Ok(Json(ops::get(&sup, &name)?))
}

/// Changes a stopped VM's CPUs, memory, command line, disks, NICs; or any VM's restart policy.
#[utoipa::path(patch, path = "/v1/vms/{name}", params(("name" = String, Path)), request_body = EditVm, responses(
    (status = 200, body = Vm), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn edit_vm(
    State(sup): State<Supervisor>,
    Path(name): Path<String>,
    body: Result<Json<EditVm>, JsonRejection>,
) -> ApiResult<Json<Vm>> {
    let Json(req) = body.map_err(bad_json)?;
    Ok(Json(ops::edit(&sup, &name, req).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

/// Deletes a VM (a running one only with `force=true`).
#[utoipa::path(delete, path = "/v1/vms/{name}", params(("name" = String, Path), ("force" = Option<bool>, Query)), responses(
    (status = 204), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn delete_vm(
    State(sup): State<Supervisor>,
    Path(name): Path<String>,
    q: Result<Query<ForceQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let Query(q) = q.map_err(bad_query)?;
    ops::delete(&sup, &name, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a stopped or crashed VM.
#[utoipa::path(post, path = "/v1/vms/{name}/start", params(("name" = String, Path)), responses(
    (status = 200, body = Vm), (status = 409, body = ApiErrorBody), (status = 500, body = ApiErrorBody)))]
async fn start_vm(State(sup): State<Supervisor>, Path(name): Path<String>) -> ApiResult<Json<Vm>> {
    Ok(Json(ops::start(&sup, &name).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopQuery {
    /// Seconds to wait for the guest to power off before forcing (default 30).
    timeout: Option<f64>,
    #[serde(default)]
    force: bool,
}

/// Stops a VM: ACPI power button, then a forced stop after `timeout` seconds (default 30).
#[utoipa::path(post, path = "/v1/vms/{name}/stop", params(("name" = String, Path), ("timeout" = Option<f64>, Query), ("force" = Option<bool>, Query)), responses(
    (status = 200, body = Vm), (status = 409, body = ApiErrorBody)))]
async fn stop_vm(
    State(sup): State<Supervisor>,
    Path(name): Path<String>,
    q: Result<Query<StopQuery>, QueryRejection>,
) -> ApiResult<Json<Vm>> {
    let Query(q) = q.map_err(bad_query)?;
    let secs = q.timeout.unwrap_or(30.0);
    if !(0.0..=3600.0).contains(&secs) {
        return Err(DaemonError::BadRequest(format!(
            "timeout {secs} is out of range: 0 to 3600 seconds"
        )));
    }
    Ok(Json(
        ops::stop(&sup, &name, Duration::from_secs_f64(secs), q.force).await?,
    ))
}

/// Resets a running VM (its VMM boots the guest again in place).
#[utoipa::path(post, path = "/v1/vms/{name}/reboot", params(("name" = String, Path)), responses(
    (status = 200, body = Vm), (status = 409, body = ApiErrorBody)))]
async fn reboot_vm(State(sup): State<Supervisor>, Path(name): Path<String>) -> ApiResult<Json<Vm>> {
    Ok(Json(ops::reboot(&sup, &name).await?))
}

/// Pauses a running VM.
#[utoipa::path(post, path = "/v1/vms/{name}/pause", params(("name" = String, Path)), responses(
    (status = 200, body = Vm), (status = 409, body = ApiErrorBody)))]
async fn pause_vm(State(sup): State<Supervisor>, Path(name): Path<String>) -> ApiResult<Json<Vm>> {
    Ok(Json(ops::pause(&sup, &name).await?))
}

/// Resumes a paused VM.
#[utoipa::path(post, path = "/v1/vms/{name}/resume", params(("name" = String, Path)), responses(
    (status = 200, body = Vm), (status = 409, body = ApiErrorBody)))]
async fn resume_vm(State(sup): State<Supervisor>, Path(name): Path<String>) -> ApiResult<Json<Vm>> {
    Ok(Json(ops::resume(&sup, &name).await?))
}

/// A VM's event log, oldest first.
#[utoipa::path(get, path = "/v1/vms/{name}/events", params(("name" = String, Path)), responses(
    (status = 200, body = Vec<VmEvent>), (status = 404, body = ApiErrorBody)))]
async fn vm_events(
    State(sup): State<Supervisor>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<VmEvent>>> {
    Ok(Json(ops::events(&sup, &name)?))
}

/// The console's recent output (text).
#[utoipa::path(get, path = "/v1/vms/{name}/log", params(("name" = String, Path)), responses(
    (status = 200, body = String, content_type = "text/plain"), (status = 404, body = ApiErrorBody)))]
async fn vm_log(State(sup): State<Supervisor>, Path(name): Path<String>) -> ApiResult<Response> {
    sup.store(|s| s.get(&name))?;
    let text = sup.console_log(&name).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from(text),
    )
        .into_response())
}

/// The protocol name of a console attach (`Upgrade: ferro-console`).
pub const CONSOLE_UPGRADE: &str = "ferro-console";

/// Attaches to the serial console: an HTTP/1.1 upgrade (`Connection: Upgrade`,
/// `Upgrade: ferro-console`) after which the connection carries raw console bytes both ways;
/// the recent output is replayed first.
#[utoipa::path(get, path = "/v1/vms/{name}/console", params(("name" = String, Path)), responses(
    (status = 101, description = "raw console bytes follow"), (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn vm_console(
    State(sup): State<Supervisor>,
    Path(name): Path<String>,
    mut req: Request,
) -> ApiResult<Response> {
    let vm = ops::get(&sup, &name)?;
    if !vm.state.has_vmm() {
        return Err(DaemonError::InvalidState(format!(
            "VM '{name}' is {}: start it first (ferro vm start {name})",
            vm.state.as_str()
        )));
    }
    let upgrade = req.headers().get(header::UPGRADE).is_some_and(|v| {
        v.as_bytes()
            .eq_ignore_ascii_case(CONSOLE_UPGRADE.as_bytes())
    });
    if !upgrade {
        return Err(DaemonError::BadRequest(format!(
            "the console is an HTTP upgrade: send Connection: Upgrade and Upgrade: {CONSOLE_UPGRADE}"
        )));
    }
    let mut vmm = tokio::net::UnixStream::connect(&vm.console_socket)
        .await
        .map_err(DaemonError::io("cannot reach the VM's console socket"))?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on_upgrade.await {
            let mut client = hyper_util::rt::TokioIo::new(up);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut vmm).await;
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, CONSOLE_UPGRADE)
        .body(Body::empty())
        .unwrap_or_default())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AsyncQuery {
    /// Answer 202 with an operation at once instead of waiting for the work.
    #[serde(default, rename = "async")]
    run_async: bool,
}

/// Runs `work` as a background operation: 202 with the operation and its `Location`.
fn background<T, F>(
    sup: &Supervisor,
    kind: &str,
    target: &str,
    work: impl FnOnce(crate::operations::Tracker) -> F,
) -> Response
where
    T: serde::Serialize,
    F: std::future::Future<Output = Result<T, DaemonError>> + Send + 'static,
{
    let (op, tracker) = sup.0.operations.begin(kind, target);
    let fut = work(tracker.clone());
    let ops = sup.0.operations.clone();
    tokio::spawn(async move {
        let r = fut
            .await
            .and_then(|v| serde_json::to_value(v).map_err(|e| DaemonError::Vmm(e.to_string())));
        ops.finish(&tracker, r);
    });
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/operations/{}", op.id))],
        Json(op),
    )
        .into_response()
}

/// Clones a stopped VM: a full copy of its disks, or a linked clone (qcow2 overlays; the
/// source's disks become read-only bases under overlays of its own). With `async=true` a
/// full copy answers 202 with an operation that shows its progress.
#[utoipa::path(post, path = "/v1/vms/{name}/clone", params(("name" = String, Path), ("async" = Option<bool>, Query)), request_body = CloneVm, responses(
    (status = 201, body = Vm), (status = 202, description = "started: poll the operation", body = Operation),
    (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
    (status = 409, body = ApiErrorBody)))]
async fn clone_vm(
    State(sup): State<Supervisor>,
    Path(name): Path<String>,
    q: Result<Query<AsyncQuery>, QueryRejection>,
    body: Result<Json<CloneVm>, JsonRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(bad_query)?;
    let Json(req) = body.map_err(bad_json)?;
    if q.run_async {
        crate::clone::precheck(&sup, &name, &req.name)?;
        let s = sup.clone();
        return Ok(background(
            &sup,
            "vm_clone",
            &req.name.clone(),
            move |t| async move { crate::clone::clone(&s, &name, &req.name, req.linked, t).await },
        ));
    }
    let vm = crate::clone::clone(&sup, &name, &req.name, req.linked, Default::default()).await?;
    Ok((StatusCode::CREATED, Json(vm)).into_response())
}

/// Every imported image.
#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = Vec<Image>)))]
async fn list_images(State(sup): State<Supervisor>) -> ApiResult<Json<Vec<Image>>> {
    Ok(Json(sup.store(|s| images::list(s))?))
}

/// Imports a disk image (qcow2, raw, VMDK, VHD, VHDX) or an OVA from a path on the daemon's
/// host, converting it to qcow2. A failed import leaves nothing behind. With `async=true` it
/// answers 202 with an operation that shows its progress.
#[utoipa::path(post, path = "/v1/images", params(("async" = Option<bool>, Query)), request_body = ImportImage, responses(
    (status = 201, body = Image), (status = 202, description = "started: poll the operation", body = Operation),
    (status = 400, body = ApiErrorBody), (status = 409, body = ApiErrorBody),
    (status = 422, description = "not a disk image, unsupported or corrupt", body = ApiErrorBody)))]
async fn import_image(
    State(sup): State<Supervisor>,
    q: Result<Query<AsyncQuery>, QueryRejection>,
    body: Result<Json<ImportImage>, JsonRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(bad_query)?;
    let Json(req) = body.map_err(bad_json)?;
    if q.run_async {
        let name = images::import_name(&sup, &req)?;
        let s = sup.clone();
        return Ok(background(
            &sup,
            "image_import",
            &name,
            move |t| async move { images::import(&s, req, t).await },
        ));
    }
    let img = images::import(&sup, req, Default::default()).await?;
    Ok((StatusCode::CREATED, Json(img)).into_response())
}

/// Every long operation still known (running, or ended within the last 10 minutes).
#[utoipa::path(get, path = "/v1/operations", responses((status = 200, body = Vec<Operation>)))]
async fn list_operations(State(sup): State<Supervisor>) -> Json<Vec<Operation>> {
    Json(sup.0.operations.list())
}

/// One long operation: its progress, and at the end its result or error.
#[utoipa::path(get, path = "/v1/operations/{id}", params(("id" = u64, Path)), responses(
    (status = 200, body = Operation), (status = 404, body = ApiErrorBody)))]
async fn get_operation(
    State(sup): State<Supervisor>,
    Path(id): Path<String>,
) -> ApiResult<Json<Operation>> {
    id.parse()
        .ok()
        .and_then(|id| sup.0.operations.get(id))
        .map(Json)
        .ok_or_else(|| DaemonError::NoSuch {
            what: "operation",
            name: id,
        })
}

/// Deletes an image and its files (refused while a VM uses it).
#[utoipa::path(delete, path = "/v1/images/{name}", params(("name" = String, Path)), responses(
    (status = 204), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn delete_image(
    State(sup): State<Supervisor>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    images::delete(&sup, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every template.
#[utoipa::path(get, path = "/v1/templates", responses((status = 200, body = Vec<Template>)))]
async fn list_templates(State(sup): State<Supervisor>) -> ApiResult<Json<Vec<Template>>> {
    Ok(Json(sup.store(|s| templates::list(s))?))
}

/// Makes a template from a stopped VM (its disks are copied) or from an image.
#[utoipa::path(post, path = "/v1/templates", request_body = CreateTemplate, responses(
    (status = 201, body = Template), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
    (status = 409, body = ApiErrorBody)))]
async fn create_template(
    State(sup): State<Supervisor>,
    body: Result<Json<CreateTemplate>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Template>)> {
    let Json(req) = body.map_err(bad_json)?;
    Ok((
        StatusCode::CREATED,
        Json(templates::create(&sup, req).await?),
    ))
}

/// Deletes a template (refused while a VM is based on it).
#[utoipa::path(delete, path = "/v1/templates/{name}", params(("name" = String, Path)), responses(
    (status = 204), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn delete_template(
    State(sup): State<Supervisor>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    templates::delete(&sup, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    /// `docs/openapi.json` is the generated document; `FERRO_BLESS=1 cargo test -p
    /// ferro-daemon openapi` rewrites it after an API change.
    #[test]
    fn openapi_document_is_checked_in() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let generated = super::openapi_json();
        if std::env::var_os("FERRO_BLESS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "docs/openapi.json is stale: run FERRO_BLESS=1 cargo test -p ferro-daemon openapi"
        );
        let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
        assert!(doc["paths"]["/v1/vms/{name}/start"]["post"].is_object());
        assert!(doc["components"]["schemas"]["Vm"].is_object());
    }
}
