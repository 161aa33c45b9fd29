// What the runtime sends back, as typed objects built from the decoded msgpack maps.
// Field names follow docs/protocol.md; a field the runtime adds later is ignored, a missing one reads as
// its zero value (Raw keeps the whole map for anything not typed here).
using System;
using System.Collections.Generic;

namespace Gllm
{
    /// <summary>Why a request failed: the runtime's error codes (bad_request, unknown_type, too_long,
    /// overloaded, shutting_down, internal, slow_client) or the client's own: timeout, disconnected, closed,
    /// protocol. Treat a code you do not know like internal.</summary>
    public sealed class LlmError
    {
        public readonly string Code;
        public readonly string Message;

        public LlmError(string code, string message)
        {
            Code = code;
            Message = message;
        }

        public override string ToString() { return Code + ": " + Message; }
    }

    /// <summary>The exception a request's Task fails with.</summary>
    public sealed class LlmException : Exception
    {
        public readonly LlmError Error;

        public LlmException(LlmError error) : base(error.ToString()) { Error = error; }
    }

    public struct TopToken
    {
        public int TokenId;
        public string Text;
        public double Logprob;
    }

    /// <summary>One generated token. Logprob is the raw log-softmax of the model (before temperature, top-k,
    /// top-p); Rank 1 is the most likely token. Text may be empty while a character is incomplete.</summary>
    public sealed class LlmToken
    {
        public int Index;
        public int TokenId;
        public string Text;
        public double Logprob;
        public int Rank;
        /// <summary>The best alternatives, best first, when GenerateOptions.Logprobs was set; else empty.</summary>
        public TopToken[] Top;
        /// <summary>Tokens injected into the context just before this one (Generation.Inject); usually 0.</summary>
        public int Injected;

        internal static LlmToken From(Dictionary<string, object> m)
        {
            var top = new List<TopToken>();
            foreach (object entry in Fields.List(m, "top"))
            {
                var row = entry as List<object>;
                if (row == null || row.Count != 3) continue;
                top.Add(new TopToken { TokenId = (int)Fields.AsLong(row[0]), Text = row[1] as string ?? "", Logprob = Fields.AsDouble(row[2]) });
            }
            return new LlmToken
            {
                Index = (int)Fields.Long(m, "index"),
                TokenId = (int)Fields.Long(m, "token_id"),
                Text = Fields.String(m, "text"),
                Logprob = Fields.Double(m, "logprob"),
                Rank = (int)Fields.Long(m, "rank"),
                Top = top.ToArray(),
                Injected = (int)Fields.Long(m, "injected"),
            };
        }
    }

    public struct Usage
    {
        public int PromptTokens, CompletionTokens, CachedTokens, InjectedTokens;
        /// <summary>Chat turns left out to fit (only with ContextOverflow "drop_oldest").</summary>
        public int? DroppedTurns;

        internal static Usage From(Dictionary<string, object> m)
        {
            object dropped = Fields.Get(m, "dropped_turns");
            return new Usage
            {
                PromptTokens = (int)Fields.Long(m, "prompt_tokens"),
                CompletionTokens = (int)Fields.Long(m, "completion_tokens"),
                CachedTokens = (int)Fields.Long(m, "cached_tokens"),
                InjectedTokens = (int)Fields.Long(m, "injected_tokens"),
                DroppedTurns = dropped == null ? (int?)null : (int)Fields.AsLong(dropped),
            };
        }
    }

    /// <summary>A saved conversation: the runtime's KV of a prompt's whole blocks. Give State to Restore
    /// later, in this runtime or another one serving the same model.</summary>
    public sealed class SavedState
    {
        public byte[] State;
        public int Tokens;

        internal static SavedState From(Dictionary<string, object> m)
        {
            return new SavedState { State = Fields.Get(m, "state") as byte[] ?? new byte[0], Tokens = (int)Fields.Long(m, "tokens") };
        }
    }

    /// <summary>A restored state: Tokens are in the runtime's prefix cache now. A pinned one stays there
    /// until LlmClient.Release(Id) or until the client disconnects.</summary>
    public sealed class RestoreResult
    {
        public long Id;
        public int Tokens;
        public bool Pinned;

        internal static RestoreResult From(Dictionary<string, object> m)
        {
            return new RestoreResult { Id = Fields.Long(m, "id"), Tokens = (int)Fields.Long(m, "tokens"), Pinned = Fields.Get(m, "pinned") as bool? ?? false };
        }
    }

    /// <summary>Milliseconds; TtftMs is null when no token was produced (a score, an early cancel).</summary>
    public struct Timing
    {
        public double? QueuedMs, TtftMs, TotalMs;

        internal static Timing From(Dictionary<string, object> m)
        {
            return new Timing { QueuedMs = Fields.OptDouble(m, "queued_ms"), TtftMs = Fields.OptDouble(m, "ttft_ms"), TotalMs = Fields.OptDouble(m, "total_ms") };
        }
    }

    /// <summary>The end of a generation. FinishReason: "stop" (end of text or a stop string), "length"
    /// (max_tokens or the context) or "cancelled" (Text then holds what was generated until the cancel).</summary>
    public sealed class Completion
    {
        public string FinishReason;
        public string Text;
        public Usage Usage;
        public Timing Timing;
        /// <summary>The tool the reply calls (GenerateOptions.Tools), else empty.</summary>
        public ToolCall[] ToolCalls;
        /// <summary>Structured output only: false when the reply was cut short (FinishReason "length", a stop
        /// string, a cancel) before its structure was whole; null for a request without one.</summary>
        public bool? StructureComplete;

        internal static Completion From(Dictionary<string, object> m)
        {
            var calls = new List<ToolCall>();
            foreach (object entry in Fields.List(m, "tool_calls"))
            {
                var c = entry as Dictionary<string, object>;
                if (c != null) calls.Add(new ToolCall { Name = Fields.String(c, "name"), Arguments = Fields.Map(c, "arguments") });
            }
            return new Completion
            {
                FinishReason = Fields.String(m, "finish_reason"),
                Text = Fields.String(m, "text"),
                Usage = Usage.From(Fields.Map(m, "usage")),
                Timing = Timing.From(Fields.Map(m, "timing")),
                ToolCalls = calls.ToArray(),
                StructureComplete = Fields.Get(m, "structure_complete") as bool?,
            };
        }
    }

    /// <summary>A call the model made: the tool's name and its arguments, valid under the tool's schema.</summary>
    public sealed class ToolCall
    {
        public string Name;
        /// <summary>Decoded msgpack values: string, long, double, bool, null, List&lt;object&gt;, Dictionary.</summary>
        public Dictionary<string, object> Arguments;

        /// <summary>The arguments as JSON text (for engines whose signals carry strings).</summary>
        public string ArgumentsJson { get { return JsonText.Write(Arguments); } }
    }

    public sealed class CandidateScore
    {
        public string Text;
        public int[] TokenIds;
        /// <summary>Sum of TokenLogprobs: the log-probability of the whole candidate after the prompt.</summary>
        public double Logprob;
        public double[] TokenLogprobs;
    }

    /// <summary>Candidates in the order they were given.</summary>
    public sealed class ScoreResult
    {
        public CandidateScore[] Candidates;
        public Usage Usage;
        public Timing Timing;

        /// <summary>Index of the most likely candidate.</summary>
        public int Best
        {
            get
            {
                int best = 0;
                for (int i = 1; i < Candidates.Length; i++)
                    if (Candidates[i].Logprob > Candidates[best].Logprob) best = i;
                return best;
            }
        }

        internal static ScoreResult From(Dictionary<string, object> m)
        {
            var list = new List<CandidateScore>();
            foreach (object entry in Fields.List(m, "candidates"))
            {
                var c = entry as Dictionary<string, object> ?? new Dictionary<string, object>();
                var ids = new List<int>();
                foreach (object id in Fields.List(c, "token_ids")) ids.Add((int)Fields.AsLong(id));
                var lps = new List<double>();
                foreach (object lp in Fields.List(c, "token_logprobs")) lps.Add(Fields.AsDouble(lp));
                list.Add(new CandidateScore { Text = Fields.String(c, "text"), TokenIds = ids.ToArray(), Logprob = Fields.Double(c, "logprob"), TokenLogprobs = lps.ToArray() });
            }
            return new ScoreResult { Candidates = list.ToArray(), Usage = Usage.From(Fields.Map(m, "usage")), Timing = Timing.From(Fields.Map(m, "timing")) };
        }
    }

    public sealed class RuntimeInfo
    {
        public string Model;
        public int VocabSize, MaxSeqLen, ProtocolVersion;
        /// <summary>Live counters (running, waiting, kv_blocks_in_use, ...) and the runtime's limits, as sent.</summary>
        public Dictionary<string, object> Stats, Limits;
        /// <summary>Names of the LoRA adapters loaded, for GenerateOptions.Adapter and Score's adapter.</summary>
        public List<string> Adapters;

        internal static RuntimeInfo From(Dictionary<string, object> m)
        {
            var adapters = new List<string>();
            foreach (object name in Fields.List(m, "adapters")) if (name is string) adapters.Add((string)name);
            return new RuntimeInfo
            {
                Model = Fields.String(m, "model"),
                VocabSize = (int)Fields.Long(m, "vocab_size"),
                MaxSeqLen = (int)Fields.Long(m, "max_seq_len"),
                ProtocolVersion = (int)Fields.Long(m, "protocol_version"),
                Stats = Fields.Map(m, "stats"),
                Limits = Fields.Map(m, "limits"),
                Adapters = adapters,
            };
        }
    }

    /// <summary>Lenient typed reads from decoded maps: any msgpack number reads as long or double.</summary>
    internal static class Fields
    {
        static readonly List<object> NoItems = new List<object>();

        public static object Get(Dictionary<string, object> m, string key)
        {
            object v;
            return m != null && m.TryGetValue(key, out v) ? v : null;
        }

        public static string String(Dictionary<string, object> m, string key) { return Get(m, key) as string ?? ""; }
        public static long Long(Dictionary<string, object> m, string key) { return AsLong(Get(m, key)); }
        public static double Double(Dictionary<string, object> m, string key) { return AsDouble(Get(m, key)); }
        public static List<object> List(Dictionary<string, object> m, string key) { return Get(m, key) as List<object> ?? NoItems; }

        public static Dictionary<string, object> Map(Dictionary<string, object> m, string key)
        {
            return Get(m, key) as Dictionary<string, object> ?? new Dictionary<string, object>();
        }

        public static double? OptDouble(Dictionary<string, object> m, string key)
        {
            object v = Get(m, key);
            return v == null ? (double?)null : AsDouble(v);
        }

        public static long AsLong(object v)
        {
            if (v is long l) return l;
            if (v is ulong u) return unchecked((long)u);
            if (v is double d) return (long)d;
            if (v is float f) return (long)f;
            return 0;
        }

        public static double AsDouble(object v)
        {
            if (v is double d) return d;
            if (v is float f) return f;
            if (v is long l) return l;
            if (v is ulong u) return u;
            return 0;
        }
    }
}
