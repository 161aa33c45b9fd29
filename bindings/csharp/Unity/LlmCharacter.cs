// A talking NPC for Unity (2021 LTS and later, Mono and IL2CPP): a persona, a short memory of the
// conversation, and UnityEvents for each streamed token and for the finished line. A thin layer over
// Gllm.LlmClient; not compiled by bindings/csharp/build.sh (it needs UnityEngine), only checked against
// stand-ins of the few Unity types it uses (Tests/EngineStubs).
//
// Setup: put the Gllm folder and this file under Assets/, start `gllm serve` (see bindings/README.md),
// add LlmCharacter to a GameObject, write its persona, wire onToken to your speech bubble, and call
// Say("Hello") from your dialogue code. Not for WebGL builds: browsers have no raw TCP sockets.
// Structured replies: put a JSON Schema in jsonSchema (the lines are then JSON your code can parse), or
// give Tools from code and handle ToolCalled (a shopkeeper's sell(item, price)).
// Saving the game: SaveState() gives bytes to write with the save (the remembered conversation and the
// runtime's KV of it, a few MB); LoadState(bytes) brings both back, so the next line starts at once.
using System.Collections.Generic;
using System.Threading.Tasks;
using Gllm;
using UnityEngine;
using UnityEngine.Events;

public class LlmCharacter : MonoBehaviour
{
    [Tooltip("gllm serve's endpoint; only loopback addresses are accepted (the protocol is unencrypted)")]
    public string endpoint = LlmClient.DefaultEndpoint;

    [TextArea(3, 10)]
    public string persona = "You are Brom, the gruff but kind blacksmith of a small mountain village. Answer in one or two short sentences.";

    public int maxTokens = 80;
    public float temperature = 0.7f;
    public float topP = 0.9f;
    [Tooltip("Exchanges remembered; older ones are dropped to keep the prompt short")]
    public int memoryTurns = 4;
    [Tooltip("A JSON Schema (JSON text) every line follows, e.g. {say, mood, action}; empty: free text")]
    [TextArea(3, 10)]
    public string jsonSchema = "";
    [Tooltip("With Tools: auto, required, none or a tool's name")]
    public string toolChoice = "auto";

    /// <summary>Tools the character may call (set from code); each call raises ToolCalled.</summary>
    public ToolSpec[] Tools;
    /// <summary>The line called a tool: its name and parsed arguments (main thread).</summary>
    public event System.Action<ToolCall> ToolCalled;

    [Header("Events (raised on the main thread)")]
    public UnityEvent<string> onToken = new UnityEvent<string>();
    public UnityEvent<string> onLine = new UnityEvent<string>();
    public UnityEvent<string> onError = new UnityEvent<string>();

    readonly List<ChatMessage> memory = new List<ChatMessage>();
    LlmClient client;
    bool ownsClient;
    Generation current;
    long? pinnedState;  // the runtime keeps this character's loaded conversation until it is released

    /// <summary>Share one connection between many characters: set this before Start (the character
    /// then leaves the client's lifetime to whoever made it).</summary>
    public LlmClient Client
    {
        get { return client; }
        set { client = value; ownsClient = false; }
    }

    public bool IsSpeaking { get { return current != null && !current.IsDone; } }

    void Start()
    {
        if (client == null)
        {
            client = new LlmClient(endpoint);  // created on the main thread: events come back to it
            ownsClient = true;
            client.Connect();
        }
    }

    /// <summary>The player says something; the answer streams through onToken, then onLine. A line still
    /// being spoken is cut off.</summary>
    public Generation Say(string playerLine)
    {
        Stop();
        var messages = new List<ChatMessage> { ChatMessage.System(persona) };
        messages.AddRange(memory);
        messages.Add(ChatMessage.User(playerLine));
        var options = new GenerateOptions { MaxTokens = maxTokens, Temperature = temperature, TopP = topP };
        if (!string.IsNullOrEmpty(jsonSchema)) options.JsonSchema = jsonSchema;
        if (Tools != null && Tools.Length > 0)
        {
            options.Tools = Tools;
            options.ToolChoice = toolChoice;
        }
        Generation line = client.Generate(messages, options);
        current = line;
        line.Token += token => { if (line == current) onToken.Invoke(token.Text); };
        line.Completed += done =>
        {
            if (line != current) return;  // cut off by a newer line
            Remember(playerLine, done.Text);
            onLine.Invoke(done.Text);
            foreach (ToolCall call in done.ToolCalls)
                if (ToolCalled != null) ToolCalled(call);
        };
        line.Failed += error => { if (line == current) onError.Invoke(error.ToString()); };
        return line;
    }

    /// <summary>The conversation so far (persona and remembered turns) with the runtime's KV of it, as bytes
    /// for the game's save file, e.g. File.WriteAllBytes(Path.Combine(Application.persistentDataPath,
    /// name + ".npc"), await SaveState()).</summary>
    public async Task<byte[]> SaveState()
    {
        var turns = new List<ChatMessage> { ChatMessage.System(persona) };
        turns.AddRange(memory);
        ConversationState state = await ConversationState.Save(client, turns);
        return state.ToBytes();
    }

    /// <summary>Brings back what SaveState wrote: the persona and remembered turns, and their KV in the
    /// runtime (pinned while this character lives when pin is set: for main characters). Returns the
    /// tokens restored; a save from another model restores none (the turns still come back).</summary>
    public async Task<int> LoadState(byte[] saved, bool pin = false)
    {
        ConversationState state = ConversationState.FromBytes(saved);
        Stop();
        memory.Clear();
        foreach (ChatMessage m in state.Messages)
        {
            if (m.Role == "system") persona = m.Content;
            else memory.Add(m);
        }
        ReleasePin();
        try
        {
            RestoreResult restored = await state.Load(client, pin);
            if (restored.Pinned) pinnedState = restored.Id;
            return restored.Tokens;
        }
        catch (LlmException e) when (e.Error.Code == "bad_request")
        {
            onError.Invoke(e.Error.ToString());
            return 0;
        }
    }

    void ReleasePin()
    {
        if (pinnedState.HasValue && client != null) client.Release(pinnedState.Value);
        pinnedState = null;
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
        while (memory.Count > 2 * memoryTurns) memory.RemoveRange(0, 2);
    }

    void OnDestroy()
    {
        Stop();
        ReleasePin();
        if (ownsClient && client != null) client.Dispose();  // never blocks
    }
}
