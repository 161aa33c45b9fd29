class_name LlmClient
extends Node
## Client of a local gLLM runtime (`gllm serve`); mirrors bindings/csharp/Gllm/LlmClient.cs.
##
##     var line := llm.generate([{"role": "system", "content": persona},
##             {"role": "user", "content": said}], {"max_tokens": 60, "temperature": 0.7})
##     line.token.connect(func(t: Dictionary) -> void: label.text += t["text"])
##     await line.ended
##
## A non-blocking StreamPeerTCP is polled in _process, every frame, with no delay: bytes are read as
## they arrive and requests are written at once. Requests made while the runtime is unreachable wait
## for the connection (up to request_timeout_sec). A lost connection fails the open requests with
## "disconnected" (the runtime cancels them) and the client reconnects with back-off by itself.
## Options are the protocol's own field names (docs/protocol.md): max_tokens, temperature, top_k,
## top_p, seed, stop, logprobs, priority, ignore_eos, thinking; for structured output json_schema (a
## Dictionary, or JSON text), grammar with grammar_syntax ("gbnf" or "lark"), regex, choices, tools
## (an Array of {name, description, parameters}) with tool_choice (see LlmRequest.tool_calls()); and
## for games context_overflow ("drop_oldest": a chat too long loses its oldest turns),
## max_tokens_per_second (pacing), deadline_ms and deterministic (with a seed, the same tokens
## whatever else runs); and affinity (a key such as the NPC's id that a cluster, gllm serve
## --replicas N, routes by; one runtime process ignores it); and adapter (the name of a LoRA
## adapter the runtime has loaded, e.g. {"adapter": "guard"}; generate, score and snapshot).
## info()'s result lists the loaded adapters in result["adapters"].
## Saving a conversation: snapshot(chat) finishes with result["state"] (a PackedByteArray for the
## save file); restore(state, true) puts it back in the runtime's cache, pinned until release(id).
##
## Loopback only: this client speaks only to a runtime on this machine. ZMTP's NULL mechanism has
## no encryption or authentication (no CurveZMQ), so other hosts are refused unless
## allow_non_loopback is set, and a runtime serving with CurveZMQ cannot be reached. Not for Web
## exports: browsers have no raw TCP.

signal connected
signal disconnected(reason: String)
## An error reply that belongs to no request (the runtime could not read the message's id).
signal error_received(code: String, message: String)

@export var host := "127.0.0.1"
@export var port := 5555
## Connect in _ready; otherwise on connect_to_runtime() or the first request.
@export var auto_connect := true
## Longest wait for the next reply of a request, also while the runtime is unreachable.
@export var request_timeout_sec := 60.0
## TCP connect plus the ZMTP handshake.
@export var connect_timeout_sec := 5.0
@export var reconnect_min_sec := 0.1
@export var reconnect_max_sec := 5.0
## PING the runtime after this long without traffic ...
@export var heartbeat_interval_sec := 1.0
## ... and take it for dead after this long.
@export var heartbeat_timeout_sec := 5.0
## Largest reply accepted: a snapshot holds a whole saved state (the runtime's --max-state-size).
@export var max_message_bytes := 256 * 1024 * 1024 + 4096
## The protocol is unencrypted: set this only on a network you fully trust.
@export var allow_non_loopback := false

var _transport := GllmTransport.new()
var _requests := {}  # id -> LlmRequest
var _activity := {}  # id -> msec of the request's last sign of life
var _next_id := 0


func _init() -> void:
	_transport.connected.connect(func() -> void: connected.emit())
	_transport.disconnected.connect(_on_disconnected)
	_transport.message_received.connect(_on_message)


func _ready() -> void:
	if auto_connect:
		connect_to_runtime()


func _process(_delta: float) -> void:
	poll()


func _exit_tree() -> void:
	close()


## Starts connecting, and reconnecting until close(). False when the host is refused.
func connect_to_runtime() -> bool:
	if not allow_non_loopback and not _is_loopback(host):
		push_error("LlmClient: %s is not a loopback address; the protocol has no encryption, " % host
				+ "so only a runtime on this machine is used (see allow_non_loopback)")
		return false
	if not _transport.is_started():
		_transport.host = host
		_transport.port = port
		_transport.connect_timeout_sec = connect_timeout_sec
		_transport.reconnect_min_sec = reconnect_min_sec
		_transport.reconnect_max_sec = reconnect_max_sec
		_transport.heartbeat_interval_sec = heartbeat_interval_sec
		_transport.heartbeat_timeout_sec = heartbeat_timeout_sec
		_transport.max_message_bytes = max_message_bytes
		_transport.start()
	return true


func is_runtime_connected() -> bool:
	return _transport.is_ready()


## Streams a completion. prompt: a String, an Array of {role, content} chat messages, or token ids
## (PackedInt32Array or an Array of ints).
func generate(prompt: Variant, options: Dictionary = {}) -> LlmRequest:
	var msg := _new_message("generate")
	_add_prompt(msg, prompt)
	msg.merge(options)
	return _start(msg)


## Log-probability of each candidate (a String, or token ids) as a continuation of the prompt.
func score(prompt: Variant, candidates: Array, options: Dictionary = {}) -> LlmRequest:
	var msg := _new_message("score")
	_add_prompt(msg, prompt)
	msg["candidates"] = candidates
	msg.merge(options)
	return _start(msg)


## Saves a conversation: finishes with {state: PackedByteArray, tokens} holding the runtime's KV
## of the prompt's whole blocks, for restore() later (here or after a restart of the runtime).
func snapshot(prompt: Variant, options: Dictionary = {}) -> LlmRequest:
	var msg := _new_message("snapshot")
	_add_prompt(msg, prompt)
	msg.merge(options)
	return _start(msg)


## Puts a saved state into the runtime's prefix cache: finishes with {tokens, pinned}. A pinned
## state survives cache pressure until release(request.id) or until this client disconnects.
func restore(state: PackedByteArray, pin := false) -> LlmRequest:
	var msg := _new_message("restore")
	msg["state"] = state
	if pin:
		msg["pin"] = true
	return _start(msg)


## Unpins a state restored with pin; unknown ids are ignored.
func release(restore_id: int) -> void:
	_transport.send(GllmMsgPack.encode({"type": "release", "id": restore_id}))


## Used by LlmRequest.inject(): text (a String) or token ids join a running generation's context.
func inject_request(request_id: int, injection: Variant) -> void:
	if not _requests.has(request_id):
		return
	var msg := {"type": "inject", "id": request_id}
	if typeof(injection) == TYPE_STRING:
		msg["text"] = injection
	else:
		msg["token_ids"] = injection
	_transport.send(GllmMsgPack.encode(msg))


## Model, limits, live statistics and loaded LoRA adapters of the runtime.
func info() -> LlmRequest:
	return _start(_new_message("info"))


## A pong, with the round trip in result["rtt_ms"]: a cheap readiness check.
func ping() -> LlmRequest:
	return _start(_new_message("ping"))


## Used by LlmRequest.cancel().
func cancel_request(request_id: int) -> void:
	if _requests.has(request_id):
		_transport.send(GllmMsgPack.encode({"type": "cancel", "id": request_id}))


## Closes the connection and stops reconnecting; open requests fail with "closed".
func close() -> void:
	var open := _requests.values()
	_requests.clear()
	_activity.clear()
	_transport.stop()
	for req: LlmRequest in open:
		req.fail("closed", "the client was closed")


## Advances the connection and the request timeouts; _process calls it every frame (call it
## yourself if processing is off).
func poll() -> void:
	_transport.poll()
	_expire_requests(Time.get_ticks_msec())


# ------------------------------------------------------------------------------------ requests
func _new_message(kind: String) -> Dictionary:
	_next_id += 1
	return {"type": kind, "id": _next_id}


func _add_prompt(msg: Dictionary, prompt: Variant) -> void:
	var kind := typeof(prompt)
	if kind == TYPE_STRING:
		msg["prompt"] = prompt
	elif kind == TYPE_ARRAY and not prompt.is_empty() and typeof(prompt[0]) == TYPE_DICTIONARY:
		msg["messages"] = prompt
	elif kind in [TYPE_ARRAY, TYPE_PACKED_INT32_ARRAY, TYPE_PACKED_INT64_ARRAY]:
		msg["prompt_token_ids"] = prompt
	else:
		push_error("LlmClient: a prompt is a String, chat messages or token ids, not "
				+ type_string(kind))


func _start(msg: Dictionary) -> LlmRequest:
	var request_id: int = msg["id"]
	var req := LlmRequest.new(self, request_id, msg["type"])
	_requests[request_id] = req
	_activity[request_id] = Time.get_ticks_msec()
	_transport.send(GllmMsgPack.encode(msg))
	if not _transport.is_started():
		connect_to_runtime()
	return req


func _expire_requests(now: int) -> void:
	for request_id: int in _requests.keys():
		if now - _activity[request_id] <= request_timeout_sec * 1000.0:
			continue
		var req: LlmRequest = _requests[request_id]
		_requests.erase(request_id)
		_activity.erase(request_id)
		_transport.send(GllmMsgPack.encode({"type": "cancel", "id": request_id}))  # may still run
		req.fail("timeout", "no reply from the runtime within %.0f s" % request_timeout_sec)


func _on_message(body: PackedByteArray) -> void:
	var decoded := GllmMsgPack.decode(body)
	var msg: Variant = decoded["value"]
	if decoded["error"] != "" or typeof(msg) != TYPE_DICTIONARY \
			or typeof(msg.get("type")) != TYPE_STRING:
		push_warning("LlmClient: dropped a malformed reply: %s" % decoded["error"])
		return
	var request_id: Variant = msg.get("id")
	if typeof(request_id) != TYPE_INT or not _requests.has(request_id):
		# Late replies to requests that timed out are expected; errors without an id are not.
		if msg["type"] == "error" and request_id == null:
			error_received.emit(str(msg.get("code", "")), str(msg.get("message", "")))
		return
	_activity[request_id] = Time.get_ticks_msec()
	var req: LlmRequest = _requests[request_id]
	if req.receive(msg):
		_requests.erase(request_id)
		_activity.erase(request_id)


func _on_disconnected(reason: String) -> void:
	_transport.drop_queued()
	var lost := _requests.values()
	_requests.clear()
	_activity.clear()
	disconnected.emit(reason)
	for req: LlmRequest in lost:
		req.fail("disconnected", "lost the connection to the runtime: " + reason)


static func _is_loopback(address: String) -> bool:
	return address in ["localhost", "::1"] or address.begins_with("127.")
