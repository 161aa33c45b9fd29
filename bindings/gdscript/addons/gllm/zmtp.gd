class_name GllmZmtp
extends RefCounted
## ZMTP 3.1 (rfc.zeromq.org/spec/37) as a DEALER peer; mirrors bindings/csharp/Gllm/Zmtp.cs.
##
## Both peers send a 64-byte greeting (we send ours whole, at once), then the NULL mechanism's READY
## command with our Socket-Type (DEALER) and an empty Identity. After that the stream is frames: a
## flags byte (bit 0 MORE, bit 1 LONG size, bit 2 COMMAND), a size (1 byte, or 8 bytes big-endian
## when LONG) and the body. The runtime sends PING heartbeats that must be answered with PONG.
##
## Only the NULL mechanism: no CurveZMQ encryption, no authentication. That is why LlmClient talks
## only to a runtime on the same machine.

const GREETING_SIZE := 64
const FLAG_MORE := 0x01
const FLAG_LONG := 0x02
const FLAG_COMMAND := 0x04
const _MECHANISM_OFFSET := 12
const _MECHANISM_SIZE := 20


## Our greeting: signature, version 3.1, mechanism NULL, as-server 0, zero filler.
static func greeting() -> PackedByteArray:
	var g := PackedByteArray()
	g.resize(GREETING_SIZE)
	g.fill(0)
	g[0] = 0xff  # signature: 0xff, 8 bytes of padding, 0x7f
	g[9] = 0x7f
	g[10] = 3  # version major
	g[11] = 1  # version minor
	var mechanism := "NULL".to_ascii_buffer()
	for i in mechanism.size():
		g[_MECHANISM_OFFSET + i] = mechanism[i]
	return g


## "" when g is a ZMTP 3.x greeting with the NULL mechanism, else what is wrong.
static func check_greeting(g: PackedByteArray) -> String:
	if g.size() != GREETING_SIZE or g[0] != 0xff or g[9] != 0x7f:
		return "the peer is not a ZeroMQ socket (bad greeting signature)"
	if g[10] < 3:
		return "the peer speaks ZMTP %d.x; version 3.0 or later is needed" % g[10]
	var mechanism := g.slice(_MECHANISM_OFFSET, _MECHANISM_OFFSET + _MECHANISM_SIZE)
	var name := mechanism.get_string_from_ascii()  # stops at the first zero byte
	if name != "NULL":
		return "the runtime uses the %s security mechanism; only NULL is spoken (no CurveZMQ)" % name
	return ""


## Flags, size and body of one message frame, ready to write.
static func message_frame(body: PackedByteArray, more := false) -> PackedByteArray:
	return _frame(FLAG_MORE if more else 0, body)


## A command frame: name length, name, data.
static func command_frame(name: String, data: PackedByteArray) -> PackedByteArray:
	var body := PackedByteArray([name.length()])
	body.append_array(name.to_ascii_buffer())
	body.append_array(data)
	return _frame(FLAG_COMMAND, body)


static func _frame(flags: int, body: PackedByteArray) -> PackedByteArray:
	var is_long := body.size() > 255
	var frame := PackedByteArray([flags | (FLAG_LONG if is_long else 0)])
	frame.append_array(be_bytes(body.size(), 8 if is_long else 1))
	frame.append_array(body)
	return frame


## READY's metadata: each property a 1-byte name length, name, 4-byte value length, value.
static func ready_data(socket_type: String) -> PackedByteArray:
	var data := _property("Socket-Type", socket_type.to_ascii_buffer())
	data.append_array(_property("Identity", PackedByteArray()))  # empty: the ROUTER picks one
	return data


static func _property(name: String, value: PackedByteArray) -> PackedByteArray:
	var out := PackedByteArray([name.length()])
	out.append_array(name.to_ascii_buffer())
	out.append_array(be_bytes(value.size(), 4))
	out.append_array(value)
	return out


## Splits a command body: {"name": String, "data": PackedByteArray}, or {"error": String}.
static func parse_command(body: PackedByteArray) -> Dictionary:
	if body.size() < 1 or body[0] == 0 or body[0] > body.size() - 1:
		return {"error": "malformed command frame (bad name length)"}
	var n := body[0]
	for i in range(1, n + 1):
		var c := body[i]
		if not ((c >= 0x41 and c <= 0x5a) or (c >= 0x61 and c <= 0x7a)):
			return {"error": "malformed command frame (the name is not letters)"}
	return {"name": body.slice(1, 1 + n).get_string_from_ascii(), "data": body.slice(1 + n)}


## READY's properties by lower-case name: {"properties": {...}}, or {"error": String}.
static func parse_metadata(data: PackedByteArray) -> Dictionary:
	var properties := {}
	var pos := 0
	while pos < data.size():
		var name_size := data[pos]
		pos += 1
		if name_size == 0 or name_size > data.size() - pos - 4:
			return {"error": "malformed READY metadata (bad property name)"}
		var name := data.slice(pos, pos + name_size).get_string_from_ascii().to_lower()
		pos += name_size
		var value_size := be_int(data, pos, 4)
		pos += 4
		if value_size > data.size() - pos:
			return {"error": "malformed READY metadata (a value runs past the command)"}
		properties[name] = data.slice(pos, pos + value_size)
		pos += value_size
	return {"properties": properties}


## PING data: a 2-byte TTL in tenths of a second (no context).
static func ping_data(ttl_sec: float) -> PackedByteArray:
	return be_bytes(clampi(int(ttl_sec * 10.0), 0, 0xffff), 2)


## {"context": the bytes a PONG must echo}, or {"error": String} for a malformed PING.
static func pong_data(ping: PackedByteArray) -> Dictionary:
	if ping.size() < 2 or ping.size() > 18:
		return {"error": "malformed PING command"}
	return {"context": ping.slice(2)}


## The low size bytes of value, most significant first.
static func be_bytes(value: int, size: int) -> PackedByteArray:
	var out := PackedByteArray()
	out.resize(size)
	for i in size:
		out[i] = (value >> (8 * (size - 1 - i))) & 0xff
	return out


## The size-byte big-endian integer at offset (8 bytes with the top bit set read as negative).
static func be_int(bytes: PackedByteArray, offset: int, size: int) -> int:
	var value := 0
	for i in size:
		value = (value << 8) | bytes[offset + i]
	return value


## Cuts a TCP byte stream into the greeting and frames. Bytes are fed as they arrive, in any
## pieces; nothing blocks, and a frame whose declared size is over the limit is refused before it
## is buffered.
class Reader:
	extends RefCounted

	## The first malformed thing seen; nothing more is read after it.
	var error := ""
	var _buf := PackedByteArray()
	var _start := 0  # unread bytes are _buf[_start:]
	var _max_frame_bytes := 0

	func _init(max_frame_bytes: int) -> void:
		_max_frame_bytes = max_frame_bytes

	func buffered() -> int:
		return _buf.size() - _start

	func feed(data: PackedByteArray) -> void:
		if _start > 0 and _start * 2 >= _buf.size():  # drop what was read, now and then
			_buf = _buf.slice(_start)
			_start = 0
		_buf.append_array(data)

	## The next n raw bytes (the greeting), or an empty array until that many have arrived.
	func take_raw(n: int) -> PackedByteArray:
		if buffered() < n:
			return PackedByteArray()
		var raw := _buf.slice(_start, _start + n)
		_start += n
		return raw

	## The next whole frame as {"command": bool, "more": bool, "body": PackedByteArray}, or {} when
	## none has arrived yet or the stream is malformed (then error says why).
	func take_frame() -> Dictionary:
		if error != "" or buffered() < 2:
			return {}
		var flags := _buf[_start]
		var header := 9 if (flags & GllmZmtp.FLAG_LONG) else 2
		error = _check_flags(flags)
		if error != "" or buffered() < header:
			return {}
		var size := GllmZmtp.be_int(_buf, _start + 1, header - 1)
		if size < 0 or size > _max_frame_bytes:  # negative: a long size with its top bit set
			error = "a frame of %d bytes is over the limit of %d" % [size, _max_frame_bytes]
		if error != "" or buffered() - header < size:
			return {}
		var body := _buf.slice(_start + header, _start + header + size)
		_start += header + size
		return {
			"command": (flags & GllmZmtp.FLAG_COMMAND) != 0,
			"more": (flags & GllmZmtp.FLAG_MORE) != 0,
			"body": body,
		}

	## What is wrong with a frame's flags, or "".
	func _check_flags(flags: int) -> String:
		var problem := ""
		if flags & 0xf8:
			problem = "malformed frame (reserved flag bits set: 0x%02x)" % flags
		elif (flags & GllmZmtp.FLAG_COMMAND) and (flags & GllmZmtp.FLAG_MORE):
			problem = "malformed frame (a command with the MORE flag)"
		return problem
