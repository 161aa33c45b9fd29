// The C# client of gLLM's runtime (protocol v1, docs/protocol.md), for Unity, Godot .NET and plain .NET.
//
//   var client = new LlmClient("tcp://127.0.0.1:5555");      // on the game's main thread
//   await client.Connect();
//   var line = client.Generate(Prompt.Chat(ChatMessage.System(persona), ChatMessage.User(said)),
//                              new GenerateOptions { MaxTokens = 60, Temperature = 0.7, TopP = 0.9 });
//   line.Token += t => bubble.text += t.Text;
//   string whole = await line.Text;
//
// All network I/O runs on background threads (see Transport). Events and Task completions are raised on
// the thread whose SynchronizationContext created the client (Unity's or Godot's main thread); a client
// created where there is none (a console program, a custom loop) raises them from Poll(), once per frame.
//
// Only for a runtime on this machine (loopback): the ZMTP NULL mechanism has no encryption or
// authentication (no CurveZMQ), so non-loopback endpoints are refused unless
// LlmClientOptions.AllowNonLoopback is set, and a runtime serving with CurveZMQ cannot be reached.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Threading;
using System.Threading.Tasks;

namespace Gllm
{
    public sealed class LlmClient : IDisposable
    {
        public const string DefaultEndpoint = "tcp://127.0.0.1:5555";

        sealed class OpenRequest
        {
            public IReplyHandler Handler;
            public long LastActivityMs;
        }

        readonly LlmClientOptions options;
        readonly EventQueue events;
        readonly Transport transport;
        readonly object gate = new object();
        readonly Dictionary<long, OpenRequest> open = new Dictionary<long, OpenRequest>();
        readonly Stopwatch clock = Stopwatch.StartNew();
        readonly TaskCompletionSource<bool> firstConnection = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
        long nextId, connectAskedMs = -1;
        bool disposed, connectTimeoutReported;
        volatile bool connected;

        /// <summary>A client whose events use the current thread's SynchronizationContext (or Poll() if none).
        /// Nothing happens on the network until Connect() or the first request.</summary>
        public LlmClient(string endpoint = DefaultEndpoint, LlmClientOptions options = null)
            : this(endpoint, options, SynchronizationContext.Current) { }

        /// <summary>A client raising its events through <paramref name="context"/>; null means through Poll().</summary>
        public LlmClient(string endpoint, LlmClientOptions options, SynchronizationContext context)
        {
            Endpoint = endpoint;
            this.options = options ?? new LlmClientOptions();
            events = new EventQueue(context);
            transport = new Transport(endpoint, this.options)
            {
                Connected = OnConnected,
                Disconnected = OnDisconnected,
                Message = OnMessage,
                Problem = problem => events.Post(() => RaiseLog(problem)),
                Tick = OnTick,
            };
            firstConnection.Task.ContinueWith(t => t.Exception, TaskContinuationOptions.OnlyOnFaulted | TaskContinuationOptions.ExecuteSynchronously);
        }

        public string Endpoint { get; private set; }

        /// <summary>True while a handshaken connection to the runtime is up.</summary>
        public bool IsConnected { get { return connected; } }

        /// <summary>True when events are raised from Poll() (no SynchronizationContext was given).</summary>
        public bool NeedsPolling { get { return events.NeedsPolling; } }

        public event Action Connected;
        /// <summary>The connection was lost (with the reason); open requests fail with code "disconnected"
        /// and the client reconnects with back-off on its own.</summary>
        public event Action<string> Disconnected;
        /// <summary>An error reply that belongs to no request (the runtime could not read the message's id).</summary>
        public event Action<LlmError> Error;
        /// <summary>Diagnostics: failed connection attempts, dropped malformed replies.</summary>
        public event Action<string> Log;

        /// <summary>Starts connecting (and reconnecting, for the client's lifetime). The Task completes on the
        /// first connection, or fails with code "timeout" after RequestTimeout without one.</summary>
        public Task Connect()
        {
            lock (gate)
            {
                if (disposed) throw new ObjectDisposedException("LlmClient");
                if (connectAskedMs < 0) connectAskedMs = clock.ElapsedMilliseconds;
            }
            transport.Start();
            return firstConnection.Task;
        }

        /// <summary>Starts a generation; see Generation for its events and Task.</summary>
        public Generation Generate(Prompt prompt, GenerateOptions options = null)
        {
            long id = NewId();
            var message = Request("generate", id);
            prompt.AddTo(message);
            if (options != null) options.AddTo(message);
            var generation = new Generation(this, id, events);
            Open(id, generation, message);
            return generation;
        }

        public Generation Generate(IEnumerable<ChatMessage> messages, GenerateOptions options = null)
        {
            return Generate(Prompt.Chat(messages), options);
        }

        /// <summary>Log-probability of each candidate text as a continuation of the prompt; affinity as in
        /// GenerateOptions; under a loaded LoRA adapter when <paramref name="adapter"/> names one.</summary>
        public Task<ScoreResult> Score(Prompt prompt, IEnumerable<string> candidates, int? priority = null,
                                       string affinity = null, string adapter = null)
        {
            return Score(prompt, new List<object>(candidates), priority, affinity, adapter);
        }

        /// <summary>Log-probability of each candidate, given as token ids.</summary>
        public Task<ScoreResult> Score(Prompt prompt, IEnumerable<int[]> candidates, int? priority = null,
                                       string affinity = null, string adapter = null)
        {
            var list = new List<object>();
            foreach (int[] ids in candidates) list.Add(ids);
            return Score(prompt, list, priority, affinity, adapter);
        }

        Task<ScoreResult> Score(Prompt prompt, List<object> candidates, int? priority, string affinity, string adapter)
        {
            long id = NewId();
            var message = Request("score", id);
            prompt.AddTo(message);
            message["candidates"] = candidates;
            if (priority.HasValue) message["priority"] = priority.Value;
            if (affinity != null) message["affinity"] = affinity;
            if (adapter != null) message["adapter"] = adapter;
            var reply = new SingleReply<ScoreResult>("scores", ScoreResult.From, events);
            Open(id, reply, message);
            return reply.Task;
        }

        /// <summary>Saves a conversation: the runtime's KV of the prompt's whole blocks (computed, or taken
        /// from its prefix cache), for Restore later. See ConversationState for a save-file format. Under a LoRA
        /// adapter the state records it and restores only where that adapter is loaded.</summary>
        public Task<SavedState> Snapshot(Prompt prompt, int? priority = null, string adapter = null)
        {
            long id = NewId();
            var message = Request("snapshot", id);
            prompt.AddTo(message);
            if (priority.HasValue) message["priority"] = priority.Value;
            if (adapter != null) message["adapter"] = adapter;
            var reply = new SingleReply<SavedState>("snapshot", SavedState.From, events);
            Open(id, reply, message);
            return reply.Task;
        }

        /// <summary>Puts a saved state into the runtime's prefix cache, so the next prompt starting with its
        /// tokens computes only the rest. Pinned, it survives cache pressure until Release(result.Id).
        /// A state from another model, or a damaged one, fails with code bad_request.</summary>
        public Task<RestoreResult> Restore(byte[] state, bool pin = false)
        {
            long id = NewId();
            var message = Request("restore", id);
            message["state"] = state;
            if (pin) message["pin"] = true;
            var reply = new SingleReply<RestoreResult>("restored", RestoreResult.From, events);
            Open(id, reply, message);
            return reply.Task;
        }

        /// <summary>Unpins a state restored with pin: true; unknown ids are ignored.</summary>
        public void Release(long restoreId)
        {
            transport.Send(restoreId, MsgPack.Encode(Request("release", restoreId)));
            transport.Start();
        }

        internal void SendInject(long id, string field, object value)
        {
            var message = Request("inject", id);
            message[field] = value;
            transport.Send(id, MsgPack.Encode(message));
        }

        /// <summary>Model, context size, limits and live statistics of the runtime.</summary>
        public Task<RuntimeInfo> Info()
        {
            long id = NewId();
            var reply = new SingleReply<RuntimeInfo>("info", RuntimeInfo.From, events);
            Open(id, reply, Request("info", id));
            return reply.Task;
        }

        /// <summary>Round trip to the runtime in milliseconds; a cheap readiness check.</summary>
        public Task<double> Ping()
        {
            long id = NewId();
            SingleReply<double> reply = null;
            reply = new SingleReply<double>("pong", _ => reply.ElapsedMs, events);
            Open(id, reply, Request("ping", id));
            return reply.Task;
        }

        /// <summary>Raises the events that arrived since the last call. Needed only when NeedsPolling; harmless otherwise.</summary>
        public int Poll()
        {
            return events.Poll();
        }

        /// <summary>Closes the connection and stops the threads without waiting for them. Open requests fail
        /// with code "closed"; the runtime cancels them when it sees the connection close.</summary>
        public void Dispose()
        {
            List<OpenRequest> orphans;
            lock (gate)
            {
                if (disposed) return;
                disposed = true;
                orphans = TakeAll();
            }
            transport.Stop();
            connected = false;
            var closed = new LlmError("closed", "the client was disposed");
            foreach (OpenRequest r in orphans) r.Handler.Fail(closed);
            events.Post(() => firstConnection.TrySetException(new LlmException(closed)));
        }

        // ----------------------------------------------------------------------------------- requests
        long NewId()
        {
            return Interlocked.Increment(ref nextId);
        }

        static Dictionary<string, object> Request(string type, long id)
        {
            return new Dictionary<string, object> { { "type", type }, { "id", id } };
        }

        void Open(long id, IReplyHandler handler, Dictionary<string, object> message)
        {
            byte[] body = MsgPack.Encode(message);
            lock (gate)
            {
                if (disposed) throw new ObjectDisposedException("LlmClient");
                if (connectAskedMs < 0) connectAskedMs = clock.ElapsedMilliseconds;
                open[id] = new OpenRequest { Handler = handler, LastActivityMs = clock.ElapsedMilliseconds };
                transport.Send(id, body);  // under the lock, so a disconnect cannot drop the queue between the two
            }
            transport.Start();
        }

        internal void SendCancel(long id)
        {
            lock (gate)
            {
                if (disposed || !open.ContainsKey(id)) return;  // finished or failed: nothing to cancel
            }
            transport.Send(id, MsgPack.Encode(Request("cancel", id)));
        }

        List<OpenRequest> TakeAll()
        {
            var all = new List<OpenRequest>(open.Values);
            open.Clear();
            return all;
        }

        // ------------------------------------------------------------------- network thread callbacks
        void OnConnected()
        {
            lock (gate) connectTimeoutReported = true;  // the first connection came: no Connect() timeout any more
            connected = true;
            events.Post(() =>
            {
                firstConnection.TrySetResult(true);
                if (Connected != null) Connected();
            });
        }

        void OnDisconnected(string reason)
        {
            List<OpenRequest> lost;
            lock (gate)
            {
                connected = false;
                transport.DropQueued();
                lost = TakeAll();
            }
            events.Post(() =>
            {
                if (Disconnected != null) Disconnected(reason);
            });
            var error = new LlmError("disconnected", "lost the connection to the runtime: " + reason);
            foreach (OpenRequest r in lost) r.Handler.Fail(error);
        }

        void OnMessage(byte[] body)
        {
            Dictionary<string, object> m;
            try
            {
                m = MsgPack.Decode(body) as Dictionary<string, object>;
            }
            catch (MsgPackException e)
            {
                events.Post(() => RaiseLog("dropped a reply that is not valid msgpack: " + e.Message));
                return;
            }
            string type = m == null ? null : Fields.Get(m, "type") as string;
            if (type == null)
            {
                events.Post(() => RaiseLog("dropped a reply that is not a map with a 'type'"));
                return;
            }
            object rawId = Fields.Get(m, "id");
            OpenRequest request = null;
            lock (gate)
            {
                if (rawId is long id && open.TryGetValue(id, out request))
                    request.LastActivityMs = clock.ElapsedMilliseconds;
            }
            if (request == null)
            {
                // Late replies to requests that timed out or were failed are expected; errors without an id are not.
                if (type == "error" && rawId == null)
                {
                    var error = new LlmError(Fields.String(m, "code"), Fields.String(m, "message"));
                    events.Post(() => { if (Error != null) Error(error); });
                }
                return;
            }
            bool last;
            try
            {
                last = request.Handler.OnReply(type, m);
            }
            catch (Exception e)  // a reply of the right type but the wrong shape
            {
                request.Handler.Fail(new LlmError("protocol", "malformed '" + type + "' reply: " + e.Message));
                last = true;
            }
            if (last)
            {
                lock (gate) open.Remove((long)rawId);
            }
        }

        void OnTick()
        {
            long now = clock.ElapsedMilliseconds, timeout = (long)options.RequestTimeout.TotalMilliseconds;
            var expired = new List<KeyValuePair<long, OpenRequest>>();
            bool connectTimedOut;
            lock (gate)
            {
                foreach (KeyValuePair<long, OpenRequest> entry in open)
                    if (now - entry.Value.LastActivityMs > timeout) expired.Add(entry);
                foreach (KeyValuePair<long, OpenRequest> entry in expired) open.Remove(entry.Key);
                connectTimedOut = !connected && !connectTimeoutReported && connectAskedMs >= 0 && now - connectAskedMs > timeout;
                connectTimeoutReported |= connectTimedOut;
            }
            var error = new LlmError("timeout", "no reply from the runtime within " + options.RequestTimeout.TotalSeconds + " s");
            foreach (KeyValuePair<long, OpenRequest> entry in expired)
            {
                if (!transport.Withdraw(entry.Key))  // it went out: it may still be running there
                    transport.Send(entry.Key, MsgPack.Encode(Request("cancel", entry.Key)));
                entry.Value.Handler.Fail(error);
            }
            if (connectTimedOut)
            {
                var noRuntime = new LlmError("timeout", "no connection to " + Endpoint + " within " + options.RequestTimeout.TotalSeconds + " s");
                events.Post(() => firstConnection.TrySetException(new LlmException(noRuntime)));
            }
        }

        void RaiseLog(string text)
        {
            if (Log != null) Log(text);
        }
    }
}
