// A talking NPC node for Godot 4 .NET: a persona, a short memory of the conversation, and signals for each
// streamed token and for the finished line. A thin layer over Gllm.LlmClient; not compiled by
// bindings/csharp/build.sh (it needs GodotSharp and Godot's source generators), only checked against
// stand-ins of the few Godot types it uses (Tests/EngineStubs).
//
// Setup: copy the Gllm folder and this file into the project, build, start `gllm serve` (see
// bindings/README.md), add an LlmNode to the scene, connect TokenReceived to your label and call
// Say("Hello"). GDScript projects use the pure-GDScript addon in bindings/gdscript instead.
// Structured replies: set JsonSchema (JSON text) for lines your code parses, or Tools (from code) and
// connect ToolCalled(name, argumentsJson).
// Not for Web exports: browsers have no raw TCP sockets.
using System.Collections.Generic;
using Gllm;
using Godot;

public partial class LlmNode : Node
{
    [Signal] public delegate void TokenReceivedEventHandler(string text);
    [Signal] public delegate void LineFinishedEventHandler(string line, string finishReason);
    [Signal] public delegate void RequestFailedEventHandler(string code, string message);
    [Signal] public delegate void RuntimeConnectedEventHandler();
    [Signal] public delegate void RuntimeDisconnectedEventHandler(string reason);
    [Signal] public delegate void ToolCalledEventHandler(string name, string argumentsJson);

    /// <summary>gllm serve's endpoint; only loopback addresses are accepted (the protocol is unencrypted).</summary>
    [Export] public string Endpoint = LlmClient.DefaultEndpoint;
    [Export(PropertyHint.MultilineText)] public string Persona = "You are Brom, the gruff but kind blacksmith of a small mountain village. Answer in one or two short sentences.";
    [Export] public int MaxTokens = 80;
    [Export] public float Temperature = 0.7f;
    [Export] public float TopP = 0.9f;
    /// <summary>Exchanges remembered; older ones are dropped to keep the prompt short.</summary>
    [Export] public int MemoryTurns = 4;
    /// <summary>A JSON Schema (JSON text) every line follows; empty: free text.</summary>
    [Export(PropertyHint.MultilineText)] public string JsonSchema = "";
    /// <summary>With Tools: auto, required, none or a tool's name.</summary>
    [Export] public string ToolChoice = "auto";
    /// <summary>Tools the NPC may call (set from code); each call emits ToolCalled.</summary>
    public ToolSpec[] Tools;

    readonly List<ChatMessage> memory = new List<ChatMessage>();
    LlmClient client;
    Generation current;

    public bool IsSpeaking { get { return current != null && !current.IsDone; } }

    public override void _Ready()
    {
        // Made on the main thread, whose SynchronizationContext brings every event back to it.
        client = new LlmClient(Endpoint);
        client.Connected += () => EmitSignal(SignalName.RuntimeConnected);
        client.Disconnected += reason => EmitSignal(SignalName.RuntimeDisconnected, reason);
        client.Connect();
    }

    public override void _ExitTree()
    {
        Stop();
        if (client != null) client.Dispose();  // never blocks
        client = null;
    }

    /// <summary>The player says something; the answer streams through TokenReceived, then LineFinished.
    /// A line still being spoken is cut off.</summary>
    public Generation Say(string playerLine)
    {
        Stop();
        var messages = new List<ChatMessage> { ChatMessage.System(Persona) };
        messages.AddRange(memory);
        messages.Add(ChatMessage.User(playerLine));
        var options = new GenerateOptions { MaxTokens = MaxTokens, Temperature = Temperature, TopP = TopP };
        if (!string.IsNullOrEmpty(JsonSchema)) options.JsonSchema = JsonSchema;
        if (Tools != null && Tools.Length > 0)
        {
            options.Tools = Tools;
            options.ToolChoice = ToolChoice;
        }
        Generation line = client.Generate(messages, options);
        current = line;
        line.Token += token => { if (line == current) EmitSignal(SignalName.TokenReceived, token.Text); };
        line.Completed += done =>
        {
            if (line != current) return;  // cut off by a newer line
            Remember(playerLine, done.Text);
            EmitSignal(SignalName.LineFinished, done.Text, done.FinishReason);
            foreach (ToolCall call in done.ToolCalls)
                EmitSignal(SignalName.ToolCalled, call.Name, call.ArgumentsJson);
        };
        line.Failed += error => { if (line == current) EmitSignal(SignalName.RequestFailed, error.Code, error.Message); };
        return line;
    }

    /// <summary>Stops the line being spoken, if any.</summary>
    public void Stop()
    {
        if (current != null) current.Cancel();
        current = null;
    }

    void Remember(string playerLine, string answer)
    {
        memory.Add(ChatMessage.User(playerLine));
        memory.Add(ChatMessage.Assistant(answer));
        while (memory.Count > 2 * MemoryTurns) memory.RemoveRange(0, 2);
    }
}
