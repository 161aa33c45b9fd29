class_name GllmMsgPack
extends RefCounted
## msgpack encoder and decoder for the gLLM protocol; mirrors bindings/csharp/Gllm/MsgPack.cs.
##
## Decoded values: nil -> null, true/false -> bool, integers -> int, float 32/64 -> float,
## str -> String, bin -> PackedByteArray, array -> Array, map -> Dictionary (String keys).
## GDScript ints are 64-bit signed, so a uint 64 above 2^63-1 decodes to the nearest float.
## Encoding uses the smallest format for every int and str, as the runtime does, and float 64 for
## every float (GDScript floats are 64-bit). msgpack is big-endian: StreamPeerBuffer.big_endian.
##
## The decoder treats its input as untrusted: lengths are checked against the bytes left before
## anything is read, nesting is bounded, and extension types, the unused 0xc1 byte, non-String map
## keys, invalid UTF-8 and trailing bytes are errors.

## Deepest nesting of arrays and maps accepted (the protocol needs 4).
const MAX_DEPTH := 64


## Encodes a value; on a value msgpack cannot carry, pushes an error and returns an empty array.
static func encode(value: Variant) -> PackedByteArray:
	var out := StreamPeerBuffer.new()
	out.big_endian = true
	var problem := _write(out, value, 0)
	if problem != "":
		push_error("GllmMsgPack.encode: " + problem)
		return PackedByteArray()
	return out.data_array


## Decodes one msgpack value that fills all of data. Returns {"value": ..., "error": ""}, or on
## malformed input {"value": null, "error": "what is wrong"}.
static func decode(data: PackedByteArray) -> Dictionary:
	var reader := _Reader.new(data)
	var value: Variant = reader.read(0)
	if reader.error == "" and reader.remaining() > 0:
		reader.error = "%d extra bytes after the msgpack value" % reader.remaining()
	if reader.error != "":
		return {"value": null, "error": reader.error}
	return {"value": value, "error": ""}


# ------------------------------------------------------------------------------------- encoding
static func _write(out: StreamPeerBuffer, v: Variant, depth: int) -> String:
	if depth > MAX_DEPTH:
		return "nesting deeper than %d" % MAX_DEPTH
	var problem := ""
	var kind := typeof(v)
	if kind == TYPE_NIL:
		out.put_u8(0xc0)
	elif kind == TYPE_BOOL:
		out.put_u8(0xc3 if v else 0xc2)
	elif kind == TYPE_INT:
		_write_int(out, v)
	elif kind == TYPE_FLOAT:
		out.put_u8(0xcb)
		out.put_double(v)
	elif kind == TYPE_STRING or kind == TYPE_STRING_NAME:
		_write_string(out, String(v))
	elif kind == TYPE_PACKED_BYTE_ARRAY:
		_write_binary(out, v)
	elif kind == TYPE_DICTIONARY:
		problem = _write_map(out, v, depth)
	elif kind in [TYPE_ARRAY, TYPE_PACKED_INT32_ARRAY, TYPE_PACKED_INT64_ARRAY,
			TYPE_PACKED_FLOAT32_ARRAY, TYPE_PACKED_FLOAT64_ARRAY, TYPE_PACKED_STRING_ARRAY]:
		_write_header(out, v.size(), 0x90, 0xdc)
		for item: Variant in v:
			problem = _write(out, item, depth + 1)
			if problem != "":
				break
	else:
		problem = "msgpack cannot carry a " + type_string(kind)
	return problem


static func _write_int(out: StreamPeerBuffer, v: int) -> void:
	if v >= 0:
		if v < 0x80:
			out.put_u8(v)
		elif v <= 0xff:
			out.put_u8(0xcc)
			out.put_u8(v)
		elif v <= 0xffff:
			out.put_u8(0xcd)
			out.put_u16(v)
		elif v <= 0xffffffff:
			out.put_u8(0xce)
			out.put_u32(v)
		else:
			out.put_u8(0xcf)
			out.put_u64(v)
	elif v >= -32:
		out.put_u8(v & 0xff)
	elif v >= -128:
		out.put_u8(0xd0)
		out.put_8(v)
	elif v >= -32768:
		out.put_u8(0xd1)
		out.put_16(v)
	elif v >= -2147483648:
		out.put_u8(0xd2)
		out.put_32(v)
	else:
		out.put_u8(0xd3)
		out.put_64(v)


static func _write_string(out: StreamPeerBuffer, s: String) -> void:
	var utf8 := s.to_utf8_buffer()
	var n := utf8.size()
	if n < 32:
		out.put_u8(0xa0 | n)
	elif n <= 0xff:
		out.put_u8(0xd9)
		out.put_u8(n)
	elif n <= 0xffff:
		out.put_u8(0xda)
		out.put_u16(n)
	else:
		out.put_u8(0xdb)
		out.put_u32(n)
	out.put_data(utf8)


static func _write_binary(out: StreamPeerBuffer, bin: PackedByteArray) -> void:
	var n := bin.size()
	if n <= 0xff:
		out.put_u8(0xc4)
		out.put_u8(n)
	elif n <= 0xffff:
		out.put_u8(0xc5)
		out.put_u16(n)
	else:
		out.put_u8(0xc6)
		out.put_u32(n)
	out.put_data(bin)


static func _write_map(out: StreamPeerBuffer, map: Dictionary, depth: int) -> String:
	_write_header(out, map.size(), 0x80, 0xde)
	var problem := ""
	for key: Variant in map:
		if typeof(key) != TYPE_STRING and typeof(key) != TYPE_STRING_NAME:
			return "map keys must be strings"
		_write_string(out, String(key))
		problem = _write(out, map[key], depth + 1)
		if problem != "":
			break
	return problem


## Array (0x90 / 0xdc) or map (0x80 / 0xde) header: fix form below 16, else 16 or 32 bit.
static func _write_header(out: StreamPeerBuffer, count: int, fix_tag: int, tag16: int) -> void:
	if count < 16:
		out.put_u8(fix_tag | count)
	elif count <= 0xffff:
		out.put_u8(tag16)
		out.put_u16(count)
	else:
		out.put_u8(tag16 + 1)
		out.put_u32(count)


## True when bytes are well-formed UTF-8 (no overlong forms, no surrogates, at most U+10FFFF).
static func is_utf8(bytes: PackedByteArray) -> bool:
	var i := 0
	var n := bytes.size()
	while i < n:
		var size := _utf8_char_size(bytes, i)
		if size == 0:
			return false
		i += size
	return true


## Bytes in the UTF-8 character starting at i, or 0 when it is malformed.
static func _utf8_char_size(bytes: PackedByteArray, i: int) -> int:
	var lead := bytes[i]
	var extra := 0
	if lead >= 0xf0:
		extra = 3
	elif lead >= 0xe0:
		extra = 2
	elif lead >= 0xc0:
		extra = 1
	elif lead >= 0x80:
		return 0  # a continuation byte cannot start a character
	if lead > 0xf4 or i + extra >= bytes.size():
		return 0
	var code := lead if extra == 0 else lead & (0x3f >> extra)
	for k in range(1, extra + 1):
		var next := bytes[i + k]
		if (next & 0xc0) != 0x80:
			return 0
		code = (code << 6) | (next & 0x3f)
	var smallest: int = [0, 0x80, 0x800, 0x10000][extra]
	if code < smallest or code > 0x10ffff or (code >= 0xd800 and code <= 0xdfff):
		return 0
	return extra + 1


# ------------------------------------------------------------------------------------- decoding
## Reads one value; the first problem is kept in error and everything after it reads as null.
class _Reader:
	extends RefCounted

	var error := ""
	var _buf := StreamPeerBuffer.new()

	func _init(data: PackedByteArray) -> void:
		_buf.big_endian = true
		_buf.data_array = data

	func remaining() -> int:
		return _buf.get_size() - _buf.get_position()

	func read(depth: int) -> Variant:
		if depth > GllmMsgPack.MAX_DEPTH:
			_fail("nesting deeper than %d" % GllmMsgPack.MAX_DEPTH)
		if not _need(1):
			return null
		var tag := _buf.get_u8()
		var value: Variant = null
		if tag <= 0x7f:
			value = tag
		elif tag >= 0xe0:
			value = tag - 0x100
		elif tag <= 0x8f:
			value = _map(tag & 0x0f, depth)
		elif tag <= 0x9f:
			value = _array(tag & 0x0f, depth)
		elif tag <= 0xbf:
			value = _string(tag & 0x1f)
		else:
			value = _tagged(tag, depth)
		return value

	func _tagged(tag: int, depth: int) -> Variant:
		var value: Variant = null
		match tag:
			0xc0:
				value = null
			0xc2:
				value = false
			0xc3:
				value = true
			0xc4, 0xc5, 0xc6:
				value = _binary(_unsigned(1 << (tag - 0xc4)))  # sizes 1, 2, 4
			0xca:
				value = _buf.get_float() if _need(4) else null
			0xcb:
				value = _buf.get_double() if _need(8) else null
			0xcc, 0xcd, 0xce:
				value = _unsigned(1 << (tag - 0xcc))
			0xcf:
				value = _unsigned64()
			0xd0, 0xd1, 0xd2, 0xd3:
				value = _signed(1 << (tag - 0xd0))
			0xd9, 0xda, 0xdb:
				value = _string(_unsigned(1 << (tag - 0xd9)))
			0xdc, 0xdd:
				value = _array(_unsigned(2 if tag == 0xdc else 4), depth)
			0xde, 0xdf:
				value = _map(_unsigned(2 if tag == 0xde else 4), depth)
			0xc1:
				_fail("0xc1 is never used in msgpack")
			_:
				_fail("extension type 0x%02x is not part of the protocol" % tag)
		return value

	## False (and an error) unless n more bytes are there.
	func _need(n: int) -> bool:
		if error != "":
			return false
		if n > remaining():
			_fail("truncated: %d bytes needed, %d left" % [n, remaining()])
			return false
		return true

	func _fail(problem: String) -> void:
		if error == "":
			error = problem

	func _unsigned(size: int) -> int:
		if not _need(size):
			return 0
		var value := 0
		match size:
			1:
				value = _buf.get_u8()
			2:
				value = _buf.get_u16()
			_:
				value = _buf.get_u32()
		return value

	func _unsigned64() -> Variant:
		if not _need(8):
			return null
		var raw := _buf.get_u64()  # wraps to negative above 2^63-1
		if raw >= 0:
			return raw
		return float(raw & 0x7fffffffffffffff) + 9223372036854775808.0

	func _signed(size: int) -> int:
		if not _need(size):
			return 0
		var value := 0
		match size:
			1:
				value = _buf.get_8()
			2:
				value = _buf.get_16()
			4:
				value = _buf.get_32()
			_:
				value = _buf.get_64()
		return value

	func _bytes(n: int) -> PackedByteArray:
		if not _need(n):
			return PackedByteArray()
		return _buf.get_data(n)[1]

	func _string(n: int) -> String:
		var utf8 := _bytes(n)
		if error == "" and not GllmMsgPack.is_utf8(utf8):
			_fail("a msgpack str is not valid UTF-8")
		return "" if error != "" else utf8.get_string_from_utf8()

	func _binary(n: int) -> PackedByteArray:
		return _bytes(n)

	func _array(count: int, depth: int) -> Array:
		var list := []
		if count > remaining():  # every item takes at least one byte
			_fail("truncated: an array of %d items with %d bytes left" % [count, remaining()])
		for _i in count:
			if error != "":
				break
			list.append(read(depth + 1))
		return list

	func _map(count: int, depth: int) -> Dictionary:
		var map := {}
		if count * 2 > remaining():  # every entry takes at least two bytes
			_fail("truncated: a map of %d entries with %d bytes left" % [count, remaining()])
		for _i in count:
			if error != "":
				break
			var key: Variant = read(depth + 1)
			if typeof(key) != TYPE_STRING:
				_fail("map keys must be strings")
			elif map.has(key):
				_fail("duplicate map key '%s'" % key)
			var value: Variant = read(depth + 1)
			if error == "":
				map[key] = value
		return map
