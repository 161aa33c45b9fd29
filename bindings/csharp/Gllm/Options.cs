// What a game hands the client: connection settings, generation options and prompts.
// Options left null are not sent, so the runtime's defaults (docs/protocol.md) apply.
using System;
using System.Collections.Generic;
using System.Linq;

namespace Gllm
{
    public sealed class LlmClientOptions
    {
        /// <summary>Longest wait for the next reply of a request (a token, the result, an error), counted
        /// from when it was made, also while the runtime is unreachable. Then it fails with code "timeout".</summary>
        public TimeSpan RequestTimeout = TimeSpan.FromSeconds(60);
        public TimeSpan ConnectTimeout = TimeSpan.FromSeconds(2);
        public TimeSpan HandshakeTimeout = TimeSpan.FromSeconds(5);
        /// <summary>Reconnect back-off: the first retry after ReconnectMin, doubling up to ReconnectMax.</summary>
        public TimeSpan ReconnectMin = TimeSpan.FromMilliseconds(100);
        public TimeSpan ReconnectMax = TimeSpan.FromSeconds(5);
        /// <summary>After this long without traffic the client sends a ZMTP PING ...</summary>
        public TimeSpan HeartbeatInterval = TimeSpan.FromSeconds(1);
        /// <summary>... and after this long it takes the runtime for dead, drops the connection and reconnects.</summary>
        public TimeSpan HeartbeatTimeout = TimeSpan.FromSeconds(5);
        /// <summary>Largest frame accepted from the runtime: a snapshot reply holds a whole saved state (the
        /// runtime's --max-state-size, 256 MiB by default, plus its fields).</summary>
        public long MaxMessageBytes = (256 << 20) + 4096;
        /// <summary>The protocol is neither encrypted nor authenticated (ZMTP NULL mechanism, no CurveZMQ), so
        /// by default only loopback addresses are accepted. Set this only on a network you fully trust.</summary>
        public bool AllowNonLoopback = false;
    }

    /// <summary>One chat turn; the runtime applies the model's chat template.</summary>
    public struct ChatMessage
    {
        public string Role;
        public string Content;

        public ChatMessage(string role, string content)
        {
            Role = role;
            Content = content;
        }

        public static ChatMessage System(string content) { return new ChatMessage("system", content); }
        public static ChatMessage User(string content) { return new ChatMessage("user", content); }
        public static ChatMessage Assistant(string content) { return new ChatMessage("assistant", content); }
    }

    /// <summary>A prompt: plain text, chat messages, or token ids. A string converts to a text prompt.</summary>
    public sealed class Prompt
    {
        readonly string field;
        readonly object value;

        Prompt(string field, object value)
        {
            if (value == null) throw new ArgumentNullException(field);
            this.field = field;
            this.value = value;
        }

        public static Prompt Text(string text) { return new Prompt("prompt", text); }

        public static Prompt Chat(IEnumerable<ChatMessage> messages)
        {
            var list = new List<object>();
            foreach (ChatMessage m in messages)
                list.Add(new Dictionary<string, object> { { "role", m.Role }, { "content", m.Content } });
            return new Prompt("messages", list);
        }

        public static Prompt Chat(params ChatMessage[] messages) { return Chat((IEnumerable<ChatMessage>)messages); }

        public static Prompt Tokens(IEnumerable<int> tokenIds) { return new Prompt("prompt_token_ids", new List<int>(tokenIds)); }

        public static implicit operator Prompt(string text) { return Text(text); }

        internal void AddTo(Dictionary<string, object> message) { message[field] = value; }
    }

    /// <summary>Sampling and limits of one generation; see docs/protocol.md for each field.</summary>
    public sealed class GenerateOptions
    {
        public int? MaxTokens;
        /// <summary>0 is greedy.</summary>
        public double? Temperature;
        public int? TopK;
        public double? TopP;
        /// <summary>Same seed, same prompt, same options: same tokens, whatever else the runtime is doing.</summary>
        public ulong? Seed;
        public string[] Stop;
        /// <summary>How many top alternatives each token event carries (0 to 20).</summary>
        public int? Logprobs;
        public int? Priority;
        public bool? IgnoreEos;
        /// <summary>Chat prompts: let a thinking model (Qwen3, SmolLM3) reason before it answers (default false).</summary>
        public bool? Thinking;
        /// <summary>A key such as the NPC's id: a cluster (gllm serve --replicas N) keeps the requests with the
        /// same key on one replica, where their conversation's KV cache is. One runtime process ignores it.</summary>
        public string Affinity;

        // Structured output (docs/protocol.md): at most one of JsonSchema, Grammar, Regex, Choices; or Tools.
        /// <summary>The reply is JSON valid under this schema: a Dictionary&lt;string, object&gt;, the schema as
        /// JSON text, or true for any JSON object.</summary>
        public object JsonSchema;
        /// <summary>A GBNF grammar (llama.cpp's format), or Lark with GrammarSyntax = "lark".</summary>
        public string Grammar;
        public string GrammarSyntax;
        /// <summary>A regular expression the whole reply matches.</summary>
        public string Regex;
        /// <summary>The reply is exactly one of these.</summary>
        public string[] Choices;
        /// <summary>Tools the model may call; Completion.ToolCalls has the call.</summary>
        public ToolSpec[] Tools;
        /// <summary>"auto" (default), "required", "none" or a tool's name.</summary>
        public string ToolChoice;

        /// <summary>"drop_oldest": a chat too long for the context loses its oldest turns after the system
        /// messages (Usage.DroppedTurns says how many) instead of failing with too_long.</summary>
        public string ContextOverflow;
        /// <summary>Pacing: the runtime computes the next token only when it is due (a line read aloud).</summary>
        public double? MaxTokensPerSecond;
        /// <summary>Wanted time to the first token; among requests of one priority, earlier deadlines go first.</summary>
        public double? DeadlineMs;
        /// <summary>With a Seed: the same tokens alone or beside any other requests (exact replay; costs speed).</summary>
        public bool? Deterministic;
        /// <summary>Name of a LoRA adapter loaded in the runtime (a personality, a faction); null: the base model.</summary>
        public string Adapter;

        internal void AddTo(Dictionary<string, object> m)
        {
            Put(m, "max_tokens", MaxTokens);
            Put(m, "temperature", Temperature);
            Put(m, "top_k", TopK);
            Put(m, "top_p", TopP);
            Put(m, "seed", Seed);
            if (Stop != null) m["stop"] = new List<object>(Stop);
            Put(m, "logprobs", Logprobs);
            Put(m, "priority", Priority);
            Put(m, "ignore_eos", IgnoreEos);
            Put(m, "thinking", Thinking);
            if (Affinity != null) m["affinity"] = Affinity;
            if (JsonSchema != null) m["json_schema"] = JsonSchema;
            if (Grammar != null) m["grammar"] = Grammar;
            if (GrammarSyntax != null) m["grammar_syntax"] = GrammarSyntax;
            if (Regex != null) m["regex"] = Regex;
            if (Choices != null) m["choices"] = new List<object>(Choices);
            if (Tools != null) m["tools"] = Tools.Select(t => (object)t.ToMap()).ToList();
            if (ToolChoice != null) m["tool_choice"] = ToolChoice;
            if (ContextOverflow != null) m["context_overflow"] = ContextOverflow;
            Put(m, "max_tokens_per_second", MaxTokensPerSecond);
            Put(m, "deadline_ms", DeadlineMs);
            Put(m, "deterministic", Deterministic);
            if (Adapter != null) m["adapter"] = Adapter;
        }

        static void Put<T>(Dictionary<string, object> m, string key, T? value) where T : struct
        {
            if (value.HasValue) m[key] = value.Value;
        }
    }

    /// <summary>A tool the model may call: its name (letters, digits, _ . -), what it does, and the JSON
    /// Schema of its arguments (a Dictionary&lt;string, object&gt; or JSON text; null: any object).</summary>
    public sealed class ToolSpec
    {
        public string Name;
        public string Description;
        public object Parameters;

        public ToolSpec(string name, string description = null, object parameters = null)
        {
            Name = name;
            Description = description;
            Parameters = parameters;
        }

        internal Dictionary<string, object> ToMap()
        {
            var m = new Dictionary<string, object> { { "name", Name } };
            if (Description != null) m["description"] = Description;
            if (Parameters != null) m["parameters"] = Parameters;
            return m;
        }
    }
}
