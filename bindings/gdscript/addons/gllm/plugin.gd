@tool
extends EditorPlugin
## Switches the gLLM addon on and off. LlmClient, LlmRequest, GllmTransport, GllmZmtp and
## GllmMsgPack are global classes (class_name), so there is nothing to register here.
