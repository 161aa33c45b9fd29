class_name LlmRequest
extends RefCounted
## One request to the runtime, returned by LlmClient.generate(), score(), snapshot(), restore(),
## info() and ping(); mirrors bindings/csharp/Gllm/Generation.cs.
##
## Signals are emitted from LlmClient's _process, on the main thread, never in the frame that made
## the request: connect them right after the call. A request ends exactly once, with finished or
## failed, and then ended; `await request.ended` and look at error_code to wait either way.

## A generated token: {index, token_id, text, logprob, rank, top?, injected?} as the runtime sent it
## (injected: tokens inject() added to the context just before this one).
signal token(token: Dictionary)
## The end: for generate the "done" message ({finish_reason, text, usage, timing}; finish_reason is
## "stop", "length" or "cancelled"; with structured output also structure_complete, and tool_calls
## when the reply calls a tool), for score the "scores" message, for info the "info" message,
## for snapshot the "snapshot" message ({state, tokens}), for restore the "restored" message
## ({tokens, pinned}), for ping the "pong" message with "rtt_ms" added.
signal finished(result: Dictionary)
## A runtime error (bad_request, too_long, ...) or the client's own: timeout, disconnected, closed.
signal failed(code: String, message: String)
## After finished or failed.
signal ended

const _REPLY_TYPES := {
	"generate": "done", "score": "scores", "snapshot": "snapshot", "restore": "restored",
	"info": "info", "ping": "pong",
}

## The client's id of this request.
var id := 0
## "generate", "score", "snapshot", "restore", "info" or "ping".
var kind := ""
## Text of the tokens so far; after a generation, its whole text.
var text := ""
var tokens: Array[Dictionary] = []
var is_done := false
var result := {}
var error_code := ""
var error_message := ""
var _client: LlmClient
var _created_msec := 0


func _init(client: LlmClient, request_id: int, request_kind: String) -> void:
	_client = client
	id = request_id
	kind = request_kind
	_created_msec = Time.get_ticks_msec()


## Asks the runtime to stop; a generation then finishes with finish_reason "cancelled". Safe to
## call at any time, any number of times.
func cancel() -> void:
	if not is_done and is_instance_valid(_client):
		_client.cancel_request(id)


## The tools a finished generation called: [{name, arguments}], arguments a Dictionary that follows
## the tool's parameters schema. Empty without tools or before the end.
func tool_calls() -> Array:
	return result.get("tool_calls", [])


## Something happens mid-line: text (a String) or token ids join the generation's context at the
## current position and it goes on from there. Ignored once the request has ended.
func inject(injection: Variant) -> void:
	if not is_done and kind == "generate" and is_instance_valid(_client):
		_client.inject_request(id, injection)


## Called by LlmClient with each reply to this request; returns true when it was the last.
func receive(msg: Dictionary) -> bool:
	var type: String = str(msg.get("type", ""))
	if type == "token" and kind == "generate":
		if not is_done:
			tokens.append(msg)
			text += str(msg.get("text", ""))
			token.emit(msg)
		return false
	if type == _REPLY_TYPES[kind]:
		if type == "pong":
			msg["rtt_ms"] = Time.get_ticks_msec() - _created_msec
		_finish(msg)
	elif type == "error":
		fail(str(msg.get("code", "internal")), str(msg.get("message", "")))
	elif type == "done":
		fail("cancelled", "the runtime cancelled the request")
	else:
		fail("protocol", "unexpected '%s' reply to a %s request" % [type, kind])
	return true


## Called by LlmClient to end the request with an error; does nothing once it has ended.
func fail(code: String, message: String) -> void:
	if is_done:
		return
	is_done = true
	error_code = code
	error_message = message
	failed.emit(code, message)
	ended.emit()


func _finish(msg: Dictionary) -> void:
	if is_done:
		return
	is_done = true
	result = msg
	if kind == "generate":
		text = str(msg.get("text", text))
	finished.emit(msg)
	ended.emit()
