extends Control
## Sample scene: talk to Brom the blacksmith; his answer streams in token by token.
##
## Start the runtime first (see bindings/README.md):
##     gllm serve --bind tcp://127.0.0.1:5555
## then run this scene. Type a line and press Enter; a new line cancels an answer still running.

const PERSONA := "You are Brom, the gruff but kind blacksmith of a small mountain village. " \
		+ "Answer the traveller in one or two short sentences, in character."
const MAX_TURNS := 8  # earlier turns are forgotten, to keep the prompt short

var _llm := LlmClient.new()
var _history: Array[Dictionary] = []
var _current: LlmRequest
var _log := RichTextLabel.new()
var _input := LineEdit.new()
var _status := Label.new()


func _ready() -> void:
	var box := VBoxContainer.new()
	box.set_anchors_and_offsets_preset(Control.PRESET_FULL_RECT)
	_log.size_flags_vertical = Control.SIZE_EXPAND_FILL
	_log.scroll_following = true
	_log.bbcode_enabled = true
	_input.placeholder_text = "Say something to Brom and press Enter"
	_input.text_submitted.connect(_on_input_submitted)
	_status.text = "connecting to the runtime..."
	box.add_child(_log)
	box.add_child(_input)
	box.add_child(_status)
	add_child(box)
	_llm.connected.connect(func() -> void: _status.text = "connected")
	_llm.disconnected.connect(func(reason: String) -> void: _status.text = "lost: " + reason)
	add_child(_llm)
	_input.grab_focus()


func _on_input_submitted(line: String) -> void:
	if line.strip_edges().is_empty():
		return
	if _current != null:
		_current.cancel()
	_input.clear()
	_log.append_text("\n[b]You:[/b] %s\n[b]Brom:[/b] " % line.replace("[", "[lb]"))
	_history.append({"role": "user", "content": line})
	var messages: Array[Dictionary] = [{"role": "system", "content": PERSONA}]
	messages.append_array(_history.slice(-MAX_TURNS))
	var request := _llm.generate(messages, {"max_tokens": 80, "temperature": 0.7, "top_p": 0.9})
	request.token.connect(_on_token.bind(request))
	request.finished.connect(_on_answer_finished.bind(request))
	request.failed.connect(func(code: String, message: String) -> void:
		_status.text = "%s: %s" % [code, message])
	_current = request


func _on_token(token: Dictionary, request: LlmRequest) -> void:
	if request == _current:  # tokens of a cancelled answer may still be on their way
		_log.add_text(token["text"])


func _on_answer_finished(result: Dictionary, request: LlmRequest) -> void:
	if request != _current:
		return
	_current = null
	_history.append({"role": "assistant", "content": result["text"]})
	var usage: Dictionary = result["usage"]
	_status.text = "%s, %d tokens in %.0f ms" % [result["finish_reason"],
			usage["completion_tokens"], result["timing"]["total_ms"]]
