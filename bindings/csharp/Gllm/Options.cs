// What a game hands the client: connection settings, generation options and prompts.
// Options left null are not sent, so the runtime's defaults (docs/protocol.md) apply.
using System;
using System.Collections.Generic;

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
        /// <summary>Largest frame accepted from the runtime.</summary>
        public long MaxMessageBytes = 16 << 20;
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
            if (Adapter != null) m["adapter"] = Adapter;
        }

        static void Put<T>(Dictionary<string, object> m, string key, T? value) where T : struct
        {
            if (value.HasValue) m[key] = value.Value;
        }
    }
}
