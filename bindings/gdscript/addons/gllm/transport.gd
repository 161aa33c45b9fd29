class_name GllmTransport
extends RefCounted
## Keeps one ZMTP connection to the runtime alive; mirrors bindings/csharp/Gllm/Transport.cs, which
## runs the same steps on background threads. Here poll() runs them, once a frame, on a
## non-blocking StreamPeerTCP: connect (retrying with back-off), greeting, READY, then frames;
## answer PINGs, send our own PING when the line is quiet, and take the runtime for dead when
## nothing arrives for heartbeat_timeout_sec.
##
## Messages sent while no connection is up wait in a queue. When an established connection is
## lost, the owner (LlmClient) drops the queue and fails its open requests on `disconnected`: the
## runtime cancels a vanished client's requests, so none can be resumed on the next connection.

signal connected
signal disconnected(reason: String)
## One whole message (a msgpack body) from the runtime.
signal message_received(body: PackedByteArray)

enum State { IDLE, CONNECTING, GREETING, HANDSHAKE, READY, BACKOFF }

var host := "127.0.0.1"
var port := 5555
var connect_timeout_sec := 5.0
var reconnect_min_sec := 0.1
var reconnect_max_sec := 5.0
var heartbeat_interval_sec := 1.0
var heartbeat_timeout_sec := 5.0
var max_message_bytes := 16 * 1024 * 1024
var _tcp := StreamPeerTCP.new()
var _reader := GllmZmtp.Reader.new(0)
var _state := State.IDLE
var _outbox: Array[PackedByteArray] = []  # message bodies waiting for a connection
var _parts: Array[PackedByteArray] = []  # frames of a multi-frame message being received
var _backoff_sec := 0.1
var _retry_at := 0
var _state_since := 0
var _last_received := 0
var _last_ping := 0


## Starts connecting (no-op when already started).
func start() -> void:
	if _state == State.IDLE:
		_backoff_sec = reconnect_min_sec
		_open()


## Closes the connection and stops reconnecting; queued messages are dropped.
func stop() -> void:
	_outbox.clear()
	_tcp.disconnect_from_host()
	_state = State.IDLE


func is_started() -> bool:
	return _state != State.IDLE


func is_ready() -> bool:
	return _state == State.READY


## Sends one message (a msgpack body) as one frame, now or once connected.
func send(body: PackedByteArray) -> void:
	if _state == State.READY:
		_put(GllmZmtp.message_frame(body))
	else:
		_outbox.append(body)


func drop_queued() -> void:
	_outbox.clear()


## Reads what has arrived, advances the handshake and heartbeats, retries after a back-off.
func poll() -> void:
	var now := Time.get_ticks_msec()
	if _state == State.BACKOFF and now >= _retry_at:
		_open()
	elif _state != State.IDLE and _state != State.BACKOFF:
		_poll_socket(now)


func _open() -> void:
	_tcp = StreamPeerTCP.new()
	_reader = GllmZmtp.Reader.new(max_message_bytes)
	_parts.clear()
	var err := _tcp.connect_to_host(host, port)
	if err != OK:
		_lost("cannot connect to %s:%d (error %d)" % [host, port, err])
		return
	_set_state(State.CONNECTING)


func _set_state(state: State) -> void:
	_state = state
	_state_since = Time.get_ticks_msec()


func _poll_socket(now: int) -> void:
	_tcp.poll()
	var status := _tcp.get_status()
	if status == StreamPeerTCP.STATUS_CONNECTING:
		_check_handshake_time(now)
		return
	if status != StreamPeerTCP.STATUS_CONNECTED:
		_lost("cannot connect to %s:%d" % [host, port] if _state == State.CONNECTING
				else "the connection closed")
		return
	if _state == State.CONNECTING:
		_tcp.set_no_delay(true)  # tokens are small messages: send each at once
		_put(GllmZmtp.greeting())
		_set_state(State.GREETING)
	var available := _tcp.get_available_bytes()
	if available > 0:
		var got: Array = _tcp.get_partial_data(available)
		if got[0] != OK:
			_lost("read failed (error %d)" % got[0])
			return
		_reader.feed(got[1])
		_last_received = now
	if _state == State.GREETING:
		_read_greeting(now)
	if _state == State.HANDSHAKE:
		_read_ready(now)
	if _state == State.READY:
		_read_frames()
	if _state == State.READY:
		_heartbeat(now)


func _read_greeting(now: int) -> void:
	var greeting := _reader.take_raw(GllmZmtp.GREETING_SIZE)
	if greeting.is_empty():
		_check_handshake_time(now)
		return
	var problem := GllmZmtp.check_greeting(greeting)
	if problem != "":
		_lost(problem)
		return
	_put(GllmZmtp.command_frame("READY", GllmZmtp.ready_data("DEALER")))
	_set_state(State.HANDSHAKE)


func _read_ready(now: int) -> void:
	var frame := _reader.take_frame()
	if frame.is_empty():
		if _reader.error != "":
			_lost(_reader.error)
		else:
			_check_handshake_time(now)
		return
	var problem := _check_ready(frame)
	if problem != "":
		_lost(problem)
		return
	_set_state(State.READY)
	_last_received = now
	_last_ping = now
	_backoff_sec = reconnect_min_sec
	for body in _outbox:
		_put(GllmZmtp.message_frame(body))
	_outbox.clear()
	connected.emit()


## "" when frame is the runtime's READY command, else what is wrong.
func _check_ready(frame: Dictionary) -> String:
	if not frame["command"]:
		return "the peer sent a message before its READY command"
	var command := GllmZmtp.parse_command(frame["body"])
	var problem: String = command.get("error", "")
	if problem == "" and command["name"] == "ERROR":
		problem = "the runtime refused the connection: " + _error_reason(command["data"])
	elif problem == "" and command["name"] != "READY":
		problem = "expected READY from the runtime, got " + command["name"]
	elif problem == "":
		problem = _check_peer_type(command["data"])
	return problem


## "" when READY's metadata names a socket type a DEALER may talk to (ROUTER or DEALER).
static func _check_peer_type(data: PackedByteArray) -> String:
	var metadata := GllmZmtp.parse_metadata(data)
	if metadata.has("error"):
		return metadata["error"]
	var raw: PackedByteArray = metadata["properties"].get("socket-type", PackedByteArray())
	var peer_type := raw.get_string_from_ascii()
	if peer_type != "ROUTER" and peer_type != "DEALER":
		return "the peer is a %s socket; a DEALER talks to a ROUTER or DEALER" % peer_type
	return ""


func _read_frames() -> void:
	while _state == State.READY:
		var frame := _reader.take_frame()
		if frame.is_empty():
			if _reader.error != "":
				_lost(_reader.error)
			return
		if frame["command"]:
			_on_command(frame["body"])
			continue
		_parts.append(frame["body"])
		if frame["more"]:
			continue
		if _parts.size() == 1:
			message_received.emit(_parts[0])
		else:
			push_warning("gLLM: dropped a message of %d frames (protocol v1 sends one)"
					% _parts.size())
		_parts.clear()


func _on_command(body: PackedByteArray) -> void:
	var command := GllmZmtp.parse_command(body)
	if command.has("error"):
		_lost(command["error"])
		return
	match command["name"]:
		"PING":
			var pong := GllmZmtp.pong_data(command["data"])
			if pong.has("error"):
				_lost(pong["error"])
			else:
				_put(GllmZmtp.command_frame("PONG", pong["context"]))
		"ERROR":
			_lost("the runtime sent ERROR: " + _error_reason(command["data"]))
		"READY":
			_lost("the runtime sent a second READY")
		_:
			pass  # PONG and commands of other socket types: any traffic is a sign of life


func _heartbeat(now: int) -> void:
	var quiet := now - _last_received
	if quiet > heartbeat_timeout_sec * 1000.0:
		_lost("no sign of life from the runtime for %.1f s" % (quiet / 1000.0))
	elif quiet >= heartbeat_interval_sec * 1000.0 \
			and now - _last_ping >= heartbeat_interval_sec * 1000.0:
		_put(GllmZmtp.command_frame("PING", GllmZmtp.ping_data(heartbeat_timeout_sec)))
		_last_ping = now


func _check_handshake_time(now: int) -> void:
	if now - _state_since > connect_timeout_sec * 1000.0:
		_lost("no handshake with %s:%d within %.1f s" % [host, port, connect_timeout_sec])


func _put(bytes: PackedByteArray) -> void:
	var err := _tcp.put_data(bytes)
	if err != OK:
		_lost("write failed (error %d)" % err)


## Drops the connection and schedules the next try: after an established connection, with the
## shortest back-off and a `disconnected` signal; after a failed attempt, doubling the back-off.
func _lost(reason: String) -> void:
	var was_ready := _state == State.READY
	_tcp.disconnect_from_host()
	if was_ready:
		_backoff_sec = reconnect_min_sec
	_set_state(State.BACKOFF)
	_retry_at = Time.get_ticks_msec() + int(_backoff_sec * 1000.0)
	_backoff_sec = minf(_backoff_sec * 2.0, reconnect_max_sec)
	if was_ready:
		disconnected.emit(reason)


static func _error_reason(data: PackedByteArray) -> String:
	if data.is_empty():
		return "(no reason given)"
	return data.slice(1, 1 + data[0]).get_string_from_ascii()
